"""Service scripts and deployment files (Prefect server, work pool, worker; MLflow/S3 tracking
and storage as they land). Everything here is opt-in: kdnas runs with no servers.
"""
