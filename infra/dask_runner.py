"""The Dask side of the candidate fan-out (``runner.kind: dask``): which cluster to use and the
Prefect task runner that submits to it.

An existing cluster is reached by ``runner.address``; without one, a local cluster of
``runner.n_workers`` processes on 127.0.0.1 lives for the length of the search (one cluster,
not one per episode: starting workers and loading the teacher in each costs seconds).
"""

from __future__ import annotations

import contextlib
import os
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


def preflight(cfg: RunnerConfig, timeout: str = "10s") -> None:
    """Before a search: the Dask runner is installed and ``runner.address`` answers with at
    least one worker; each failure is one clear line."""
    if cfg.kind != "dask":
        return
    _require()
    if not cfg.address:
        return
    from distributed import Client

    try:
        with Client(cfg.address, timeout=timeout) as client:
            workers = client.scheduler_info().get("workers")
    except OSError as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise KdnasError(f"runner.address = {cfg.address!r}: no Dask scheduler answers ({reason}); start one "
                         "(infra/dask-cluster.sh start) or set runner.address: null for a local cluster") from None
    if not workers:
        raise KdnasError(f"runner.address = {cfg.address!r}: the Dask scheduler has no workers; "
                         "start some (infra/dask-cluster.sh start, or `dask worker <address>`)")
    remote = remote_workers(list(workers))
    if remote and not os.environ.get("PREFECT_API_URL"):
        raise KdnasError(f"runner.address = {cfg.address!r}: workers on other machines ({remote[0]}"
                         f"{', ...' if len(remote) > 1 else ''}) cannot reach the ephemeral Prefect API of this "
                         "process; start a Prefect server (infra/prefect-server.sh) and set PREFECT_API_URL here "
                         "and on the workers")


def remote_workers(addresses: list[str]) -> list[str]:
    """Worker addresses that are not on this machine's loopback."""
    import ipaddress
    from urllib.parse import urlparse

    out = []
    for address in addresses:
        host = urlparse(address).hostname or ""
        try:
            local = ipaddress.ip_address(host).is_loopback
        except ValueError:
            local = host == "localhost"
        if not local:
            out.append(address)
    return out


@contextlib.contextmanager
def dask_cluster(cfg: RunnerConfig) -> Iterator[str | None]:
    """The scheduler address to submit candidates to (None with the local runner)."""
    if cfg.kind != "dask":
        yield None
        return
    _require()  # the scheduler itself was checked by preflight() when the search started
    from distributed import LocalCluster

    if cfg.address:
        yield cfg.address
        return
    import dask

    # Processes, not threads: each worker has its own torch and teacher, as on a real cluster.
    # Workers only take resources they were declared with, so local workers declare the
    # resources each candidate asks for (one unit each: one candidate per worker).
    # None unsets Dask's default MALLOC_TRIM_THRESHOLD_ (see worker_environ); the nanny's env
    # argument wins over Dask's config and over what an earlier nanny left in os.environ.
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}), \
            LocalCluster(n_workers=cfg.n_workers, threads_per_worker=cfg.threads_per_worker, processes=True,
                         host="127.0.0.1", dashboard_address=None, env={**worker_environ(cfg), **_prefect_api()},
                         resources={k: 1.0 for k in cfg.resources} or None) as cluster:
        yield cluster.scheduler_address


def _prefect_api() -> dict[str, str]:
    """The API this flow reports to, for local workers: without it each worker starts a
    throwaway ephemeral server of its own (measured: 25 s before its first candidate), and its
    task runs are missing from the flow's API and task cache."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        url = str(client.api_url).rstrip("/")
    return {"PREFECT_API_URL": url} if url.startswith("http") else {}


def worker_environ(cfg: RunnerConfig) -> dict[str, str]:
    """Environment of local workers: each its share of the cores for torch, and none of Dask's
    default MALLOC_TRIM_THRESHOLD_. Setting any malloc threshold switches off glibc's adaptive
    mmap threshold, and every large tensor is then mmapped afresh: measured here, a proxy
    distillation took 11.7 s instead of 5.4 s (MALLOC_MMAP_THRESHOLD_=32 MiB gets it back to
    6.0 s where a cluster sets the trim threshold anyway: infra/dask-cluster.sh does)."""
    threads = str(cfg.torch_threads or max(1, (os.cpu_count() or 1) // cfg.n_workers))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}


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
