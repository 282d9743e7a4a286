"""Prefect flows: control flow only (order, fan-out, subflows, deployment entry points).

``kdnas`` (deployment ``search``) is the search; ``kdnas distill`` runs one final distillation
without Prefect.
"""
