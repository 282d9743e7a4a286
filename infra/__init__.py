"""Service scripts and deployment files (Prefect server, work pool, worker, Dask cluster), MLflow
tracking and the registered model, S3 storage. Everything here is opt-in: kdnas runs with no
servers.
"""
