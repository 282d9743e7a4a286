"""Checks of everything a search talks to, before the teacher runs: one place, called by the
CLI before it starts Prefect and by the flow when it is started another way (a deployment)."""

from __future__ import annotations

from kdnas_core.config import KDNASConfig


def check_services(cfg: KDNASConfig) -> None:
    """The tracking server or store, the artifact and shared-cache buckets, the Dask scheduler:
    each failure is one line naming the setting."""
    if cfg.tracking.enabled:
        from infra.tracking import preflight

        preflight(cfg)
    if cfg.paths.shared_cache:
        from infra.storage import check_access

        check_access(cfg.paths.shared_cache, field="paths.shared_cache")
    from infra import dask_runner

    dask_runner.preflight(cfg.runner)
