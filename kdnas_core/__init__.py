"""kdnas_core: the KD-NAS algorithm, free of orchestration, tracking and storage code.

Search space, student builder, teachers, corpora, distillation, latency, reward, controller,
search loop, export and evaluation (docs/architecture.md maps the modules). Imports no prefect,
mlflow or boto3 (tests/core/test_purity.py).
"""

from kdnas_core.errors import KdnasError

__all__ = ["KdnasError"]
