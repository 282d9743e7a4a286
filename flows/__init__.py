"""Prefect flows: control flow only (order, fan-out, subflows, deployment entry points).

The search flow ``kdnas`` (deployment ``search``) lands with the orchestration issue; until then
``kdnas distill`` runs the core recipe directly.
"""
