"""Outages mid-search against real local servers.

- The S3 endpoint behind the MLflow server goes away for ~60 s and comes back: the search goes
  on, artifacts are spooled and uploaded when the endpoint returns, nothing is lost, and the flow
  reports the delay.
- The MLflow server itself stops mid-search and stays down: the search finishes on disk, then
  fails with one clear line saying nothing is lost; once the server is back, rerunning the same
  command logs what is missing, redoes no candidate and registers nothing twice.

The endpoint is a local S3 server (moto, in memory) behind a TCP switch: switching it off refuses
connections and cuts open ones, as a stopped server would, while the objects uploaded before the
outage survive (a restarted in-memory moto would forget them, which would hide losses).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time

import pytest

from tests.integration.support import REPO, free_port

pytestmark = [pytest.mark.integration, pytest.mark.reliability, pytest.mark.slow]
OUTAGE_S = 60


class Switch:
    """A TCP forwarder on 127.0.0.1 that can be switched off and on."""

    def __init__(self, target_port: int):
        self.port, self.target = free_port(), target_port
        self.listener: socket.socket | None = None
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()

    def on(self) -> None:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(64)
        self.listener = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()

    def off(self) -> None:
        if self.listener:
            self.listener.close()
            self.listener = None
        with self.lock:
            for c in self.conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self.conns.clear()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass


def wait_for_first_tracked_candidate(client, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exp = client.get_experiment_by_name("kdnas")
        if exp and client.search_runs([exp.experiment_id], "tags.`kdnas.status` = 'evaluated'"):
            return
        time.sleep(0.2)


@pytest.fixture()
def servers(tmp_path, monkeypatch):
    s3_port, mlflow_port = free_port(), free_port()
    switch = Switch(s3_port)
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    env = {**os.environ, **creds, "KDNAS_S3_PORT": str(s3_port), "KDNAS_MLFLOW_PORT": str(mlflow_port),
           "KDNAS_BUCKET": "kdnas-outage", "KDNAS_MLFLOW_DIR": str(tmp_path / "mlflow"),
           "PREFECT_HOME": str(tmp_path / "prefect-home")}
    for k, v in creds.items():
        monkeypatch.setenv(k, v)
    try:
        subprocess.run(["bash", "infra/s3-server.sh", "start"], cwd=REPO, env=env, check=True, timeout=120)
        switch.on()
        # the MLflow server reaches S3 only through the switch
        mlflow_env = {**env, "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{switch.port}"}
        subprocess.run(["bash", "infra/mlflow-server.sh", "start"], cwd=REPO, env=mlflow_env, check=True, timeout=200)
        mlflow_ctl = lambda action: subprocess.run(["bash", "infra/mlflow-server.sh", action], cwd=REPO,  # noqa: E731
                                                   env=mlflow_env, check=True, timeout=200)
        yield {"uri": f"http://127.0.0.1:{mlflow_port}", "s3": f"http://127.0.0.1:{s3_port}", "bucket": "kdnas-outage",
               "switch": switch, "mlflow": mlflow_ctl}
    finally:
        switch.off()
        subprocess.run(["bash", "infra/mlflow-server.sh", "stop"], cwd=REPO, env=env, timeout=60)
        subprocess.run(["bash", "infra/s3-server.sh", "stop"], cwd=REPO, env=env, timeout=60)


def test_s3_outage_mid_search_loses_nothing(servers, prefect_harness, tiny_config):
    from mlflow.tracking import MlflowClient

    from flows.search import kdnas
    from infra.storage import list_keys

    client = MlflowClient(servers["uri"])
    outage: dict = {}

    def cut_after_first_candidate():
        wait_for_first_tracked_candidate(client)
        servers["switch"].off()
        outage["start"] = time.monotonic()
        time.sleep(OUTAGE_S)
        servers["switch"].on()
        outage["end"] = time.monotonic()

    watcher = threading.Thread(target=cut_after_first_candidate, daemon=True)
    watcher.start()
    out = kdnas(config_path=str(tiny_config), research=False,
                overrides={"tracking.uri": servers["uri"], "tracking.spool_wait_s": 240})
    watcher.join(timeout=OUTAGE_S + 60)
    assert outage.get("end"), "the outage never happened: the first candidate was never tracked"

    spool = out["tracking_spool"]
    assert spool["pending"] == 0 and spool["uploaded"] > 0 and spool["waited_s"] > 0, spool
    # nothing lost: every candidate's artifacts, the search tables and the final student are in S3
    keys = list_keys(servers["bucket"], "mlflow/", servers["s3"])
    parent = out["tracking_run_id"]
    runs = client.search_runs([client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    candidates = [r for r in runs if r.data.tags.get("kdnas.status") == "evaluated"]
    assert len(candidates) == out["evaluated"] == 4
    for r in candidates:
        assert any(k.endswith(f"{r.info.run_id}/artifacts/arch.json") for k in keys), r.info.run_name
    assert any(k.endswith("search/leaderboard.csv") for k in keys)
    assert any(k.endswith("student/model.safetensors") for k in keys)
    assert not list((tiny_config.parent / "runs" / ".tracking-spool").glob("*"))
    report = {"outage_s": round(outage["end"] - outage["start"], 1), "artifacts_spooled_and_uploaded": spool["uploaded"],
              "waited_at_end_s": spool["waited_s"], "artifacts_lost": 0, "candidates_tracked": len(candidates)}
    (REPO / "runs" / "test-artifacts").mkdir(parents=True, exist_ok=True)
    (REPO / "runs" / "test-artifacts" / "reliability-outage.json").write_text(json.dumps(report, indent=2))


def test_mlflow_server_down_mid_search_fails_clearly_and_the_rerun_syncs(servers, prefect_harness, tiny_config):
    from mlflow.tracking import MlflowClient

    from flows.search import kdnas
    from infra.tracking import TrackingError

    client = MlflowClient(servers["uri"])
    overrides = {"tracking.uri": servers["uri"], "distill.proxy.epochs": 15}  # candidates slow enough to miss
    stopped: dict = {}

    def stop_after_first_candidate():
        wait_for_first_tracked_candidate(client)
        servers["mlflow"]("stop")
        stopped["at"] = time.monotonic()

    watcher = threading.Thread(target=stop_after_first_candidate, daemon=True)
    watcher.start()
    with pytest.raises(TrackingError, match=r"tracking server unavailable at the end of the search .* nothing is lost: "
                                            r"results are complete in .*rerun the same command"):
        kdnas(config_path=str(tiny_config), research=False, overrides=overrides)
    watcher.join(timeout=60)
    assert stopped.get("at"), "the server was never stopped: the first candidate was never tracked"

    runs_dir = tiny_config.parent / "runs"
    (folder,) = [p.parent for p in (runs_dir / "search").glob("*/state.json")]
    observed = json.loads((folder / "state.json").read_text())["observations"]
    assert len(observed) == 4 and len(list((runs_dir / "students").glob("*/model.safetensors"))) >= 1

    servers["mlflow"]("start")  # same SQLite store: what was logged before the outage is still there
    exp = client.get_experiment_by_name("kdnas")
    before = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("kdnas.status") == "evaluated"]
    assert len(before) < 4  # the outage really cost the tracking of candidates

    out = kdnas(config_path=str(tiny_config), research=False, overrides=overrides)
    parent = out["tracking_run_id"]
    runs = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    candidates = [r.info.run_name for r in runs if r.data.tags.get("kdnas.status") == "evaluated"]
    assert sorted(candidates) == sorted(o["arch_id"] for o in observed)  # all there, each once
    finals = [r for r in runs if r.data.tags.get("kdnas.status") == "final"]
    assert len(finals) == len(out["final"]) and all(r.info.status == "FINISHED" for r in finals)
    model = next(iter(out["final"].values()))["registered"]["model"]
    assert len(client.search_model_versions(f"name = '{model}'")) == len(out["final"])
    # the rerun reused every evaluation and final student
    events = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]
    done = [e["arch_id"] for e in events if e["event"] == "evaluation-done"]
    assert len(done) == len(set(done)) == 4
    report = {"candidates_logged_before_outage": len(before), "candidates_synced_by_rerun": 4 - len(before),
              "candidates_redone": 0, "finals_registered_twice": 0}
    (REPO / "runs" / "test-artifacts").mkdir(parents=True, exist_ok=True)
    (REPO / "runs" / "test-artifacts" / "reliability-mlflow-outage.json").write_text(json.dumps(report, indent=2))
