"""Downstream evaluation: does a student keep what its teacher knows?

``downstream`` (the evaluation tasks: classification, retrieval, similarity, clustering; named
so they are not confused with the Prefect tasks in ``tasks/``), ``packaged`` and ``mteb_source``
(where their texts come from), ``scoring`` (per-item outcomes), ``evaluate`` (embedding, gap
closed, bootstrap, fidelity) and ``table`` (the downstream table of teacher, students, floors
and baselines).
"""
