"""kdnas_core: the KD-NAS algorithm, free of orchestration, tracking and storage code.

Search space, student builder, teachers, corpora, distillation (and, as they land, latency,
reward, controller, evaluation). Imports no prefect, mlflow or boto3 (tests/core/test_purity.py).
"""

from kdnas_core.errors import KdnasError

__all__ = ["KdnasError"]
