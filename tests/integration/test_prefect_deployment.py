"""Server mode end to end: a real Prefect server on 127.0.0.1, the work pool, the deployment from
infra/prefect.yaml, a worker, and `prefect deployment run kdnas/search` on a tiny config."""

import os
import re
import subprocess

import pytest

from tests.integration.support import REPO, free_port

pytestmark = pytest.mark.integration


@pytest.fixture()
def server_env(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), KDNAS_PREFECT_PORT=str(port),
               PREFECT_API_URL=f"http://127.0.0.1:{port}/api")
    subprocess.run(["bash", "infra/prefect-server.sh", "start"], cwd=REPO, env=env, check=True, timeout=240)
    try:
        yield env
    finally:
        subprocess.run(["bash", "infra/deploy.sh", "stop-worker"], cwd=REPO, env=env, timeout=60)
        subprocess.run(["bash", "infra/prefect-server.sh", "stop"], cwd=REPO, env=env, timeout=60)


def prefect(env, *args, timeout=120):
    return subprocess.run([str(REPO / ".venv/bin/prefect"), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_deployment_runs_on_a_real_server_with_its_schedule(server_env, tiny_config):
    subprocess.run(["bash", "infra/deploy.sh"], cwd=REPO, env=server_env, check=True, timeout=300)
    info = prefect(server_env, "deployment", "inspect", "kdnas/search")
    assert info.returncode == 0, info.stderr
    assert "0 3 * * 0" in info.stdout  # the weekly re-search schedule is registered

    run = prefect(server_env, "deployment", "run", "kdnas/search", "--param", f"config_path={tiny_config}",
                  "--param", "final=false", "--watch", "--watch-timeout", "600", timeout=660)
    out = run.stdout + run.stderr
    assert run.returncode == 0 and "Completed" in out, out[-3000:]
    assert list((tiny_config.parent / "runs" / "search").rglob("report.md"))

    bad = prefect(server_env, "deployment", "run", "kdnas/search", "--param", f"config_path={tiny_config}",
                  "--param", 'overrides={"distill.lr": -1}', "--watch", "--watch-timeout", "300", timeout=360)
    text = bad.stdout + bad.stderr
    assert "Failed" in text or bad.returncode != 0, text[-2000:]
    flow_run = re.search(r"UUID: ([0-9a-f-]{36})", text)
    assert flow_run, text[-2000:]
    logs = prefect(server_env, "flow-run", "logs", flow_run.group(1))
    assert "distill.lr = -1" in logs.stdout and "greater than 0" in logs.stdout, logs.stdout[-3000:]
