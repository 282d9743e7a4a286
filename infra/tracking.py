"""MLflow tracking of a search: one parent run per search, one child run per candidate (named by
``arch_id``), final students registered with an alias per latency budget.

Everything goes through an explicit ``MlflowClient`` and explicit run ids, never MLflow's
thread-local "active run": Prefect tasks may run on other threads.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from kdnas_core.config import KDNASConfig
from kdnas_core.errors import KdnasError

_MAX_PARAM = 6000  # MLflow's limit on a parameter value


class TrackingError(KdnasError):
    pass


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """A tracking server that does not answer fails here in seconds, with one clear line,
    instead of after MLflow's minutes of retries deep inside a search."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as resp:
            if resp.status == 200:
                return
            problem = f"HTTP {resp.status}"
    except urllib.error.HTTPError as err:
        problem = f"HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:
        problem = str(getattr(err, "reason", err))
    raise TrackingError(f"tracking.uri = {uri!r}: no MLflow server answers ({problem}); start one "
                        "(infra/mlflow-server.sh) or unset tracking.uri / MLFLOW_TRACKING_URI for the local store")


def tracking_uri(cfg: KDNASConfig) -> str:
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db = cfg.paths.output_path().resolve() / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def _local_artifacts(cfg: KDNASConfig, uri: str) -> str | None:
    # With a local store, artifacts go beside it; a server decides its own artifact store.
    return (cfg.paths.output_path().resolve() / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parents[1]).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _metric_key(name: str) -> str:
    return re.sub(r"[^\w\-./ ]", "_", name)


class Tracker:
    def __init__(self, cfg: KDNASConfig):
        self.cfg = cfg
        self.uri = tracking_uri(cfg)
        check_reachable(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        name = cfg.tracking.experiment
        exp = self.client.get_experiment_by_name(name)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
            name, artifact_location=_local_artifacts(cfg, self.uri))

    @property
    def model_name(self) -> str:
        return self.cfg.tracking.registered_model or f"kdnas-{Path(self.cfg.teacher.name).name}"

    def start_search(self, search_key: str, teacher_ms: float, info: dict[str, Any]) -> str:
        """The parent run: flattened config as params, teacher latency and data fingerprints."""
        tags = {"kdnas.search": search_key, "kdnas.teacher": self.cfg.teacher.name,
                "kdnas.controller": self.cfg.controller.kind}
        commit = _git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        run = self.client.create_run(self.experiment_id, run_name=f"search-{search_key}", tags=tags)
        rid = run.info.run_id
        params = [Param(k, v[:_MAX_PARAM]) for k, v in flatten(self.cfg.model_dump(mode="json")).items()]
        params += [Param(f"data.{k}", str(v)) for k, v in info.items()]
        for i in range(0, len(params), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(rid, params=params[i : i + 100])
        self.client.log_metric(rid, "teacher_latency_ms", teacher_ms)
        return rid

    def log_candidate(self, parent_id: str, obs: dict, latency_report: dict | None = None,
                      losses: list[float] | None = None) -> str:
        """A child run named by arch_id: architecture params, KD loss, reward, latency."""
        arch = obs["arch_dict"]
        tags = [RunTag("mlflow.parentRunId", parent_id), RunTag("kdnas.arch", obs["arch"]),
                RunTag("kdnas.episode", str(obs["episode"])), RunTag("kdnas.controller", self.cfg.controller.kind),
                RunTag("kdnas.status", "failed" if obs.get("extra", {}).get("status") == "failed" else "evaluated")]
        if obs.get("extra", {}).get("error"):
            tags.append(RunTag("kdnas.error", str(obs["extra"]["error"])[:5000]))
        run = self.client.create_run(self.experiment_id, run_name=obs["arch_id"])
        rid = run.info.run_id
        params = [Param(k, str(v)) for k, v in arch.items()] + [Param("arch", obs["arch"]), Param("arch_id", obs["arch_id"])]
        for k in ("params_m", "flops_g"):
            if obs.get(k) is not None:
                params.append(Param(k, f"{obs[k]:.4f}"))
        now = 0
        metrics = [Metric(k, float(obs[k]), now, 0) for k in ("reward", "kd_loss", "latency_ms", "episode")]
        metrics += [Metric(_metric_key(k), float(v), now, 0) for k, v in obs.get("extra", {}).items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for backend, shapes in (latency_report or {}).get("results", {}).items():
            for shape, st in shapes.items():
                metrics += [Metric(_metric_key(f"latency.{backend}.{shape}.{s}"), float(st[s]), now, 0)
                            for s in ("median_ms", "p90_ms", "cv")]
        metrics += [Metric("proxy_kd_loss", float(v), now, i) for i, v in enumerate(losses or [])]
        self.client.log_batch(rid, metrics=metrics, params=params, tags=tags)
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "arch.json"
            p.write_text(json.dumps({"arch": obs["arch"], "arch_id": obs["arch_id"], **arch}, indent=2))
            self.client.log_artifact(rid, str(p))
            if latency_report:
                q = Path(tmp) / "latency.json"
                q.write_text(json.dumps(latency_report, indent=2))
                self.client.log_artifact(rid, str(q))
        self.client.set_terminated(rid, "FAILED" if obs.get("extra", {}).get("status") == "failed" else "FINISHED")
        return rid

    def log_search_results(self, parent_id: str, out_dir: Path) -> None:
        """Leaderboard, Pareto front, recommendations, report and state (for resume/warm start)."""
        for name in ("leaderboard.csv", "pareto.csv", "recommendations.csv", "report.md", "state.json", "pareto.png",
                     "evaluation.csv", "evaluation.md"):
            f = Path(out_dir) / name
            if f.is_file():
                self.client.log_artifact(parent_id, str(f), "search")

    def register_student(self, parent_id: str, student_dir: Path, budgets: list[str], metrics: dict[str, float]) -> dict:
        """Log a final student folder (safetensors, tokenizer, ONNX) and register it as a new
        version, with one alias per budget it was chosen for, e.g. ``budget-0.25x``."""
        budget = ",".join(budgets)
        info = json.loads((Path(student_dir) / "kdnas_arch.json").read_text())
        run = self.client.create_run(self.experiment_id, run_name=f"final-{info['arch_id']}", tags={
            "mlflow.parentRunId": parent_id, "kdnas.arch": info["name"], "kdnas.status": "final", "kdnas.budget": budget})
        rid = run.info.run_id
        self.client.log_batch(rid, metrics=[Metric(_metric_key(k), float(v), 0, 0) for k, v in metrics.items()
                                            if isinstance(v, (int, float))])
        self.client.log_artifacts(rid, str(student_dir), "student")
        self.client.set_terminated(rid, "FINISHED")
        name = self.model_name
        if not self._model_exists(name):
            self.client.create_registered_model(name, description="kdnas students, one alias per latency budget")
        source = f"{self.client.get_run(rid).info.artifact_uri}/student"
        version = self.client.create_model_version(name, source, run_id=rid, tags={"arch": info["name"], "budget": budget})
        aliases = ["budget-" + re.sub(r"[^A-Za-z0-9_-]", "_", b) for b in budgets]
        for alias in aliases:
            self.client.set_registered_model_alias(name, alias, version.version)
        return {"model": name, "version": version.version, "aliases": aliases, "run_id": rid}

    def _model_exists(self, name: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
            return True
        except MlflowException:
            return False

    def finish(self, parent_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(parent_id, status)
