"""MLflow tracking of a search: one parent run per search, one child run per candidate (named by
``arch_id``), final students registered with an alias per latency budget.

Everything goes through an explicit ``MlflowClient`` and explicit run ids, never MLflow's
thread-local "active run": Prefect tasks may run on other threads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from kdnas_core.files.atomic import discard_partial, partial_dir, remove_stale_partials
from kdnas_core.config import KDNASConfig
from kdnas_core.search.controller import observation_status
from kdnas_core.errors import ConfigError, KdnasError
from kdnas_core.workspace import check_writable

_MAX_PARAM = 6000  # MLflow's limit on a parameter value
# MLflow retries a failed request 7 times with growing waits by default (minutes per call); an
# outage is handled here instead: artifacts are spooled and uploaded later.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
# Registering a student checks its input example by loading the model, which draws a download
# bar for every file of it: screens of bars in the middle of a search's output.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Waits between upload attempts of one artifact before it is spooled.
UPLOAD_BACKOFF_S = (1, 3)

# The experiment kind by which MLflow UIs choose their model-training pages over the GenAI ones.
# MLflow 3.17's own UI ignores it for a global GenAI / Model training switch (GenAI unless the
# browser chose otherwise), so kdnas's links to the UI also carry workflowType=machine_learning.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
# A saved view of the experiment (an experiment tag; MLflow's "Views" menu lists it): the candidate
# runs, best reward first, with the numbers a search is judged by as table columns and as the
# only charts. Without it the table shows none of them until a user picks columns, candidates sit
# folded under their search's parent run, and the charts bury them among every other metric.
CANDIDATE_VIEW = "kdnas-candidates"
CANDIDATE_METRICS = ("reward", "kd_loss", "latency_ms", "params_m")


def _candidate_view() -> str:
    # Widths in pixels, wide enough for most digits of a metric and a whole architecture name
    # (L4-H384-A12-F1536-gelu); MLflow applies widths only to the columns it is given an order for.
    widths = {**{f"metrics.`{k}`": 150 for k in CANDIDATE_METRICS}, "metrics.`params_m`": 100, "params.`arch`": 190}
    state = {"searchFilter": "tags.`kdnas.episode` IS NOT NULL",  # candidate runs only, as a flat list
             "orderByKey": "metrics.`reward`", "orderByAsc": False,
             "selectedColumns": list(widths), "columnOrder": list(widths), "columnWidths": widths,
             "chartsSearchFilter": f"^({'|'.join(CANDIDATE_METRICS)})$"}
    now = int(time.time() * 1000)
    return json.dumps({"name": "kdnas candidates", "createdAt": now, "updatedAt": now, "state": json.dumps(state)})


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


# Stores MLflow 3 can track to; a plain folder (the file store) is retired and refuses to start.
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
OTHER_SCHEMES = ("http", "https", "databricks", "databricks-uc")


def check_tracking_uri(uri: str, field: str = "tracking.uri") -> None:
    """Every kind of tracking URI is checked before a search starts, each failure one line:
    a server that does not answer, an SQLite file that cannot be written, a plain folder (the
    retired file store), a scheme MLflow does not know."""
    scheme = uri.split(":", 1)[0].lower() if re.match(r"^[A-Za-z][\w+.-]*:", uri) else ""
    if scheme in ("http", "https"):
        check_reachable(uri)
        return
    if scheme in ("", "file"):
        raise TrackingError(f"{field} = {uri!r}: a plain folder is MLflow's file store, which MLflow 3 no longer "
                            "supports; use sqlite:///<folder>/mlflow.db or a server URL (http://...)")
    if scheme == "sqlite":
        path = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
        if path is None or not str(path):
            raise TrackingError(f"{field} = {uri!r}: expected sqlite:///<path to a .db file>")
        folder = path.parent if path.parent != Path("") else Path(".")
        try:
            check_writable(folder, "folder")
        except ConfigError as err:
            why = str(err).rsplit("not writable ", 1)[-1]
            raise TrackingError(f"{field} = {uri!r}: cannot write the SQLite store in {folder} {why}") from None
        return
    if scheme.split("+")[0] not in DATABASE_SCHEMES + OTHER_SCHEMES:
        raise TrackingError(f"{field} = {uri!r}: unknown tracking store {scheme!r}; expected http(s)://host:port, "
                            "sqlite:///<path>.db or a database URL (postgresql://, mysql://, mssql://)")


def tracking_uri(cfg: KDNASConfig) -> str:
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db = cfg.paths.output_path().resolve() / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def _local_artifacts(cfg: KDNASConfig, uri: str) -> str | None:
    # An explicit location wins; with a local store, artifacts go beside it; otherwise the
    # server decides.
    if cfg.tracking.artifact_location:
        return cfg.tracking.artifact_location
    return (cfg.paths.output_path().resolve() / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None


def preflight(cfg: KDNASConfig) -> None:
    """Before a tracked search starts: the tracking server answers and the S3 artifact location
    is writable with the credentials at hand; each failure is one clear line."""
    field = "tracking.uri" if cfg.tracking.uri else "MLFLOW_TRACKING_URI"
    check_tracking_uri(tracking_uri(cfg), field)
    if (cfg.tracking.artifact_location or "").startswith("s3://"):
        from infra.storage import check_access

        check_access(cfg.tracking.artifact_location)


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


# Where a registered model is put together, beside the output folder (and the students, so
# their files can be hard-linked); a folder left by a killed run is removed by the next one.
MODEL_BUILD_PREFIX = ".mlflow-model-"
# The serving environment of a registered student: what infra/mlflow_model.py imports, no torch.
SERVING_PACKAGES = ("mlflow", "onnxruntime", "tokenizers", "numpy", "pandas")


def serving_requirements() -> list[str]:
    """Pinned to what is installed here (where the model was checked), never inferred: MLflow's
    inference loads the model in a subprocess (slow) and would list kdnas's own dependencies."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return [f"{name}=={version(name)}" for name in SERVING_PACKAGES]
    except PackageNotFoundError as err:
        raise TrackingError(f"cannot pin the registered model's requirements: {err.name} is not installed") from None


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def save_student_model(student_dir: Path, work: Path, onnx: str = "fp32") -> Path:
    """The student folder as an MLflow pyfunc model in ``work/model`` (see infra/mlflow_model.py):
    ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` run it; the folder itself is kept
    whole under ``artifacts/student``. ``onnx`` (fp32 | int8) is the file it runs by default."""
    import mlflow
    import numpy as np
    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from infra import mlflow_model
    from kdnas_core import onnx_embedder

    student_dir = Path(student_dir)
    onnx_file = student_dir / onnx_embedder.ONNX_FILES[onnx]
    if not onnx_file.is_file():
        raise TrackingError(f"{onnx_file}: missing; export the student to ONNX before registering it "
                            f"(tracking.model_onnx = {onnx!r})")
    try:  # the same checks serving makes, before anything is uploaded
        dim = mlflow_model.StudentEncoder().open(student_dir, onnx).dim
    except (OSError, ValueError, RuntimeError) as err:  # onnxruntime's load errors are RuntimeErrors
        raise TrackingError(f"{student_dir}: cannot be served as an MLflow model: {err}") from None
    # MLflow names the artifact folder after its source and refuses symlinks that leave the
    # source folder: hard links give it a folder named "student" without copying the weights.
    stage = Path(work) / "student"
    shutil.copytree(student_dir, stage, copy_function=_link_or_copy)
    model_dir = Path(work) / "model"
    info = json.loads((student_dir / "kdnas_arch.json").read_text())
    mlflow.pyfunc.save_model(
        path=str(model_dir),
        python_model=mlflow_model.__file__,  # models-from-code: see the docstring of infra/mlflow_model.py
        code_paths=[onnx_embedder.__file__],
        artifacts={"student": str(stage)},
        # MLflow ignores (with a warning) a model_config key that load_model is given but the
        # model was not saved with: both keys are saved so that both can be changed at load.
        model_config={"onnx": onnx, "batch_size": onnx_embedder.BATCH_SIZE},
        # No input schema: MLflow 3 would enforce one before the model sees the input. An unnamed
        # string column hands the model only the first column (a DataFrame with "id" and "text"
        # embedded the ids); a named "text" column refuses a list, a Series or any other name,
        # and an optional one drops them silently. mlflow_model.texts_of takes the "text" column
        # (shown by the input example) and refuses non-strings instead.
        signature=ModelSignature(inputs=None, outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, dim))])),
        input_example=pd.DataFrame({"text": ["a small fast sentence encoder", "distilled from a big teacher"]}),
        pip_requirements=serving_requirements(),
        metadata={"kdnas_arch": info["name"], "kdnas_arch_id": info["arch_id"], "onnx": onnx, "dim": dim},
    )
    return model_dir


def _candidates_path(experiment_id: str) -> str:
    return f"#/experiments/{experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={CANDIDATE_VIEW}"


class Tracker:
    def __init__(self, cfg: KDNASConfig):
        self.cfg = cfg
        self.uri = tracking_uri(cfg)
        # Every tracking task checks again: when the server goes away mid-search, a task fails
        # in milliseconds with a clear line instead of after MLflow's request timeout, and the
        # search goes on (results stay in state.json and are synced later).
        check_reachable(self.uri)
        # Artifacts that could not be uploaded (artifact store down) wait here, complete, until
        # flush_spool() uploads them: an outage delays artifacts, it never loses them.
        self.spool = cfg.paths.output_path().resolve() / ".tracking-spool"
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        name = cfg.tracking.experiment
        exp = self.client.get_experiment_by_name(name)
        ui_tags = {EXPERIMENT_KIND[0]: EXPERIMENT_KIND[1], f"mlflow.sharedViewState.{CANDIDATE_VIEW}": _candidate_view()}
        if exp is None:
            self.experiment_id = self.client.create_experiment(name, artifact_location=_local_artifacts(cfg, self.uri),
                                                               tags=ui_tags)
        else:
            # An experiment kdnas did not create (or one from before these tags) gets only the tags
            # it lacks: a kind or view a user set stays as it is.
            self.experiment_id = exp.experiment_id
            for key, value in ui_tags.items():
                if key not in exp.tags:
                    self.client.set_experiment_tag(self.experiment_id, key, value)

    def candidates_url(self) -> str:
        """The experiment's candidate runs in the MLflow UI (the saved view above); for a local
        store, as served by ``mlflow ui`` on its default port."""
        base = self.uri.rstrip("/") if self.uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
        return f"{base}/{_candidates_path(self.experiment_id)}"

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
        # The run's description in the UI; a link relative to the page works behind any host name.
        tags["mlflow.note.content"] = (f"Candidate runs of this experiment, best reward first: "
                                       f"[kdnas candidates]({_candidates_path(self.experiment_id)})")
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
        existing = self.client.search_runs([self.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}' and "
                                           f"attributes.run_name = '{obs['arch_id']}'", max_results=1)
        if existing and existing[0].info.status in ("FINISHED", "FAILED"):
            return existing[0].info.run_id  # logged already (a retried or resumed call): no duplicate
        arch = obs["arch_dict"]
        tags = [RunTag("mlflow.parentRunId", parent_id), RunTag("kdnas.arch", obs["arch"]),
                RunTag("kdnas.episode", str(obs["episode"])), RunTag("kdnas.controller", self.cfg.controller.kind),
                RunTag("kdnas.status", "failed" if observation_status(obs) == "failed" else "evaluated")]
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
        # params_m is a param too (as in earlier searches), but only a metric can be charted; a proxy
        # distillation's extra numbers below usually carry it already.
        if obs.get("params_m") is not None and "params_m" not in obs.get("extra", {}):
            metrics.append(Metric("params_m", float(obs["params_m"]), now, 0))
        metrics += [Metric(_metric_key(k), float(v), now, 0) for k, v in obs.get("extra", {}).items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)]
        # The reward's quality term (reward.quality) and every quality signal of the proxy run
        # (kdnas_core/search/signals.py), to chart against each other in the UI.
        if obs.get("quality") is not None:
            metrics.append(Metric("quality", float(obs["quality"]), now, 0))
        metrics += [Metric(_metric_key(f"signal.{k}"), float(v), now, 0)
                    for k, v in (obs.get("extra", {}).get("signals") or {}).items()
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
            self.upload(rid, p)
            if latency_report:
                q = Path(tmp) / "latency.json"
                q.write_text(json.dumps(latency_report, indent=2))
                self.upload(rid, q)
        self.client.set_terminated(rid, "FAILED" if observation_status(obs) == "failed" else "FINISHED")
        return rid

    def log_search_results(self, parent_id: str, out_dir: Path) -> None:
        """Leaderboard, Pareto front, recommendations, report and state (for resume/warm start)."""
        for name in ("leaderboard.csv", "pareto.csv", "recommendations.csv", "report.md", "state.json", "pareto.png",
                     "evaluation.csv", "evaluation.md"):
            f = Path(out_dir) / name
            if f.is_file():
                self.upload(parent_id, f, "search")

    def register_student(self, parent_id: str, student_dir: Path, budgets: list[str], metrics: dict[str, float]) -> dict:
        """Log a final student as an MLflow pyfunc model (texts in, sentence embeddings out; the
        student folder with safetensors, tokenizer and ONNX files inside it, under
        ``artifacts/student``) and register it as a new version, with one alias per budget it
        was chosen for, e.g. ``budget-0_25x``."""
        budget = ",".join(budgets)
        info = json.loads((Path(student_dir) / "kdnas_arch.json").read_text())
        name = self.model_name
        aliases = ["budget-" + re.sub(r"[^A-Za-z0-9_-]", "_", b) for b in budgets]
        # A rerun of the search (after a tracking outage or a crash) registers nothing twice:
        # a finished final run that already has a model version is reused as it is.
        done = self.client.search_runs([self.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}' and "
                                       f"attributes.run_name = 'final-{info['arch_id']}' and "
                                       "attributes.status = 'FINISHED'", max_results=1)
        if done and self._model_exists(name):
            versions = self.client.search_model_versions(f"name = '{name}' and run_id = '{done[0].info.run_id}'")
            if versions:
                for alias in aliases:
                    self.client.set_registered_model_alias(name, alias, versions[0].version)
                return {"model": name, "version": versions[0].version, "aliases": aliases, "run_id": done[0].info.run_id}
        # Built before the run exists: a student that cannot be served fails here, with nothing
        # half-registered.
        remove_stale_partials(self.spool.parent, MODEL_BUILD_PREFIX)
        work = partial_dir(self.spool.parent, MODEL_BUILD_PREFIX)
        try:
            model_dir = save_student_model(Path(student_dir), work, self.cfg.tracking.model_onnx)
            run = self.client.create_run(self.experiment_id, run_name=f"final-{info['arch_id']}", tags={
                "mlflow.parentRunId": parent_id, "kdnas.arch": info["name"], "kdnas.status": "final",
                "kdnas.budget": budget})
            rid = run.info.run_id
            self.client.log_batch(rid, metrics=[Metric(_metric_key(k), float(v), 0, 0) for k, v in metrics.items()
                                                if isinstance(v, (int, float))])
            self.upload(rid, model_dir, "student")  # spooled complete during an outage, so work can go
        finally:
            discard_partial(work)
        self.client.set_terminated(rid, "FINISHED")
        if not self._model_exists(name):
            self.client.create_registered_model(name, description="kdnas students, one alias per latency budget")
        source = f"{self.client.get_run(rid).info.artifact_uri}/student"
        version = self.client.create_model_version(name, source, run_id=rid, tags={"arch": info["name"], "budget": budget})
        for alias in aliases:
            self.client.set_registered_model_alias(name, alias, version.version)
        return {"model": name, "version": version.version, "aliases": aliases, "run_id": rid}

    # ------------------------------------------------------------------ artifacts and outages

    def _log(self, run_id: str, local: Path, artifact_path: str | None) -> None:
        if local.is_dir():
            self.client.log_artifacts(run_id, str(local), artifact_path)
        else:
            self.client.log_artifact(run_id, str(local), artifact_path)

    def upload(self, run_id: str, local: Path, artifact_path: str | None = None) -> bool:
        """Upload a file or folder, retrying with backoff; if the store stays down, keep a copy
        in the spool and return False (flush_spool uploads it later)."""
        error: Exception | None = None
        # Already spooling (the store is down): one attempt, so an outage does not cost every
        # artifact the whole backoff.
        waits = (0,) if self.spooled() else (0, *UPLOAD_BACKOFF_S)
        for wait in waits:
            time.sleep(wait)
            try:
                self._log(run_id, Path(local), artifact_path)
                return True
            except Exception as err:  # noqa: BLE001 - boto, HTTP and MLflow errors all mean "not now"
                error = err
        self._spool(run_id, Path(local), artifact_path, error)
        return False

    def _spool(self, run_id: str, local: Path, artifact_path: str | None, error: Exception | None) -> None:
        self.spool.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.spool, prefix=".entry-"))
        target = tmp / "files" / local.name
        target.parent.mkdir()
        (shutil.copytree if local.is_dir() else shutil.copy2)(local, target)
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if error and str(error) else ''}"[:300]
        (tmp / "entry.json").write_text(json.dumps({"run_id": run_id, "artifact_path": artifact_path,
                                                    "name": local.name, "since": time.time(), "error": reason}))
        tmp.rename(self.spool / uuid.uuid4().hex)  # complete, or absent

    def spooled(self) -> list[Path]:
        # ".entry-*" folders are spools still being written (or killed midway): never uploaded
        return sorted(p for p in self.spool.glob("*") if not p.name.startswith(".") and (p / "entry.json").is_file()) \
            if self.spool.is_dir() else []

    def flush_spool(self) -> dict:
        """One attempt at every spooled artifact; returns what was uploaded and what waits."""
        uploaded, oldest = 0, None
        for entry in self.spooled():
            info = json.loads((entry / "entry.json").read_text())
            try:
                self._log(info["run_id"], entry / "files" / info["name"], info["artifact_path"])
            except Exception:  # noqa: BLE001 - still down; stays spooled
                oldest = min(oldest or info["since"], info["since"])
                continue
            shutil.rmtree(entry, ignore_errors=True)
            uploaded += 1
        pending = len(self.spooled())
        return {"uploaded": uploaded, "pending": pending,
                "oldest_pending_s": round(time.time() - oldest, 1) if oldest else 0.0}

    def logged_candidates(self, parent_id: str) -> set[str]:
        """arch_ids of the candidate runs already under ``parent_id``."""
        runs = self.client.search_runs([self.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=5000)
        return {r.info.run_name for r in runs if r.data.tags.get("kdnas.status") in ("evaluated", "failed")}

    def _model_exists(self, name: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
            return True
        except MlflowException:
            return False

    def finish(self, parent_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(parent_id, status)
