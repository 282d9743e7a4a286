"""Tracking (MLflow), artifact storage (S3 through boto3), service start/stop scripts, Prefect
deployment and work-pool files. Everything here is opt-in: kdnas runs with no servers.
Lands with the orchestration and tracking issues.
"""
