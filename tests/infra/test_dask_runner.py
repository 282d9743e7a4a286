"""The Dask side of the fan-out, without a cluster."""

import pytest

from infra.dask_runner import remote_workers, worker_environ
from kdnas_core.config import RunnerConfig


def test_remote_workers_are_told_apart_from_this_machines():
    addresses = ["tcp://127.0.0.1:4001", "tcp://localhost:4002", "tcp://[::1]:4003", "tcp://10.0.3.7:4004",
                 "tls://worker-2.cluster.local:4005"]
    assert remote_workers(addresses) == ["tcp://10.0.3.7:4004", "tls://worker-2.cluster.local:4005"]


@pytest.mark.parametrize("n_workers, torch_threads, expected", [(1, None, None), (2, None, None), (2, 3, "3")])
def test_local_workers_share_the_cores_and_never_set_a_malloc_threshold(n_workers, torch_threads, expected, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    env = worker_environ(RunnerConfig(kind="dask", n_workers=n_workers, torch_threads=torch_threads))
    assert env["OMP_NUM_THREADS"] == (expected or str(4 // n_workers))
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"]
    assert not any(k.startswith("MALLOC_") for k in env)
