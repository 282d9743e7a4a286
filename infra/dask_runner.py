"""The Dask side of the candidate fan-out (``runner.kind: dask``): which cluster to use and the
Prefect task runner that submits to it.

An existing cluster is reached by ``runner.address``; without one, a local cluster of
``runner.n_workers`` processes on 127.0.0.1 lives for the length of the search (one cluster,
not one per episode: starting workers and loading the teacher in each costs seconds).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from kdnas_core.config import RunnerConfig
from kdnas_core.errors import ConfigError, KdnasError


def _require():
    try:
        import distributed  # noqa: F401
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ConfigError("runner.kind = 'dask' needs prefect-dask and distributed: pip install 'kdnas[dask]'") from None
    return DaskTaskRunner


@contextlib.contextmanager
def dask_cluster(cfg: RunnerConfig) -> Iterator[str | None]:
    """The scheduler address to submit candidates to (None with the local runner)."""
    if cfg.kind != "dask":
        yield None
        return
    _require()
    from distributed import Client, LocalCluster

    if cfg.address:
        try:
            with Client(cfg.address, timeout="20s") as client:
                if not client.scheduler_info().get("workers"):
                    raise KdnasError(f"runner.address = {cfg.address!r}: the Dask scheduler has no workers; "
                                     "start some (infra/dask-cluster.sh start, or `dask worker <address>`)")
        except OSError as err:
            raise KdnasError(f"runner.address = {cfg.address!r}: no Dask scheduler answers ({err}); "
                             "start one (infra/dask-cluster.sh start) or set runner.address: null for a local cluster") from None
        yield cfg.address
        return
    # Processes, not threads: each worker has its own torch and teacher, as on a real cluster.
    # Workers only take resources they were declared with, so local workers declare the
    # resources each candidate asks for (one unit each: one candidate per worker).
    with LocalCluster(n_workers=cfg.n_workers, threads_per_worker=cfg.threads_per_worker, processes=True,
                      host="127.0.0.1", dashboard_address=None,
                      resources={k: 1.0 for k in cfg.resources} or None) as cluster:
        yield cluster.scheduler_address


def task_runner(address: str):
    """prefect-dask's task runner on the given scheduler."""
    return _require()(address=address)


@contextlib.contextmanager
def resources(required: dict[str, float]) -> Iterator[None]:
    """Dask worker resources each submitted task holds, e.g. {"GPU": 1}: one candidate per GPU."""
    if not required:
        yield
        return
    import dask

    with dask.annotate(resources=dict(required)):
        yield
