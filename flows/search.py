"""The KD-NAS search as a Prefect flow: flow ``kdnas``, deployment ``search``.

Control flow only: the job's order is kdnas_core.pipeline's ``run_search_job`` (the same recipe
as ``kdnas search --no-prefect``) and the episode loop is kdnas_core's ``run_search``; here each
episode's candidates fan out as ``profile-latency`` and ``proxy-distill`` tasks (at most
``search.max_parallel`` at once, or over a Dask cluster with ``runner.kind: dask``), and the
chosen students go through a ``final-distill`` subflow each. Results land in
``<paths.output_dir>/search/<config hash>/`` and as Prefect artifacts.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from infra.dask_runner import dask_cluster, task_runner
from infra.dask_runner import resources as dask_resources
from infra.preflight import check_services
from kdnas_core.config import KDNASConfig, config_from_parameters
from kdnas_core.search.candidates import EventLog, RecordedEvaluator
from kdnas_core.final import FinalStudent
from kdnas_core.pipeline import EvaluationTable, final_from_dict, run_search_job
from kdnas_core.progress import Phases
from kdnas_core.search.loop import Evaluation
from kdnas_core.search.space import StudentArch
from kdnas_core.search.runner import search_dir, search_in_folder
from tasks.search_tasks import (
    evaluate_students_task,
    evaluation_from,
    export_onnx_task,
    final_distill,
    prepare_teacher_states,
    profile_latency,
    proxy_distill,
    publish_search_tables,
    screen_candidates,
    teacher_latency_ms,
    workspace,
)
from tasks.tracking_tasks import candidates_url, close_search_run, open_search_run, track_candidate

DEFAULT_CONFIG = "configs/default.yaml"


def _in_waves(calls: list, width: int) -> list:
    """Run task calls at most ``width`` at a time; results in order, an exception in place of
    the result of a call that failed (one failed candidate must not stop the search).

    With width 1 the tasks are called directly: they then run on the flow's own thread, where
    torch's thread pool is already warm (measured: a worker thread made each proxy
    distillation 10-30 % slower on 2 cores).
    """
    results: list = []
    if width == 1:
        for fn, args in calls:
            try:
                results.append(fn(*args))
            except Exception as err:  # noqa: BLE001 - recorded as a failed candidate
                results.append(err)
        return results
    for i in range(0, len(calls), width):
        futures = [fn.submit(*args) for fn, args in calls[i : i + width]]
        for f in futures:
            try:
                results.append(f.result())
            except Exception as err:  # noqa: BLE001
                results.append(err)
    return results


@flow(name="evaluate-candidates")
def evaluate_candidates(cfg: dict, archs: list[str], resources: dict[str, float]) -> list:
    """One episode's proxy distillations fanned out on the task runner this subflow is given
    (prefect-dask's DaskTaskRunner): all at once, the cluster decides where and how many run."""
    with dask_resources(resources):
        futures = [proxy_distill.submit(cfg, a) for a in archs]
    out: list = []
    for f in futures:
        try:
            out.append(f.result())
        except Exception as err:  # noqa: BLE001 - a failed candidate, recorded as such
            out.append(err)
    return out


@flow(name="final-distill", log_prints=True)
def final_distill_flow(cfg: dict, arch: str) -> dict:
    """Full-corpus distillation of one chosen architecture, then ONNX fp32 + int8 export."""
    student = final_distill(cfg, arch)
    exported = export_onnx_task(cfg, arch, student["path"])
    return {**student, **exported}


def evaluate_episode(c: dict, cfg: KDNASConfig, archs: list[StudentArch], dask_address: str | None,
                     side: dict[str, dict]) -> list[Evaluation]:
    """One episode's candidates: latency and proxy distillation as tasks, in waves on this
    process or, with a Dask cluster, latency here one at a time (every candidate timed on the
    same machine, never next to a distillation) and the distillations fanned out. ``side``
    collects each candidate's latency report and loss curve for its tracking run."""
    if dask_address is None:
        calls = [(profile_latency, (c, a.name)) for a in archs] + [(proxy_distill, (c, a.name)) for a in archs]
        res = _in_waves(calls, cfg.search.max_parallel)
        lat, kd = res[: len(archs)], res[len(archs):]
    else:
        lat = _in_waves([(profile_latency, (c, a.name)) for a in archs], 1)
        kd = evaluate_candidates.with_options(task_runner=task_runner(dask_address))(
            c, [a.name for a in archs], dict(cfg.runner.resources))
    out = []
    for a, latency, proxy in zip(archs, lat, kd):
        ev = evaluation_from(latency, proxy, cfg.reward.quality)
        if ev.failed:
            get_run_logger().warning("candidate %s failed: %s", a.name, ev.extra.get("error"))
        else:
            side[a.arch_id] = {"report": latency["report"], "curve": proxy.get("loss_curve")}
        out.append(ev)
    return out


class PrefectSteps:
    """The job's steps as Prefect tasks and subflows (kdnas_core.pipeline.run_search_job calls
    them in order): the teacher's states and latency, the episodes' candidates fanned out, each
    final student as a ``final-distill`` subflow, the evaluation as a task. Each candidate is
    logged and, with tracking on, a child run of the search's parent run (opened once the
    teacher's latency is known)."""

    def __init__(self, cfg: KDNASConfig, research: bool):
        self.cfg, self.c, self.research = cfg, cfg.model_dump(mode="json"), research
        self.parent: str | None = None
        self._reports: dict[str, dict] = {}  # arch_id -> latency report and loss curve, for tracking

    def teacher(self) -> float:
        prep = prepare_teacher_states(self.c)
        teacher_ms = teacher_latency_ms(self.c)
        get_run_logger().info("teacher %s: %.2f ms; proxy cache %s", self.cfg.teacher.name, teacher_ms,
                              prep["proxy_cache"])
        if self.cfg.tracking.enabled:
            info = {"splits_fingerprint": workspace(self.cfg).splits.fingerprint, **prep}
            self.parent = open_search_run(self.c, search_dir(self.cfg), teacher_ms, info)
        return teacher_ms

    def search(self, teacher_ms: float):
        cfg, out = self.cfg, search_dir(self.cfg)
        with dask_cluster(cfg.runner) as dask_address:
            if dask_address:
                get_run_logger().info("candidates fan out over the Dask cluster at %s", dask_address)
            # evals/ and events.jsonl as in the plain loop: a killed flow resumes without sending a
            # recorded candidate out again, even where Prefect's own result cache is not shared.
            recorded = RecordedEvaluator.batch(partial(evaluate_episode, self.c, cfg, dask_address=dask_address,
                                                       side=self._reports), out, EventLog(out))
            result = search_in_folder(cfg, workspace(cfg).space, teacher_ms, evaluate_batch=recorded,
                                      research=self.research, on_observation=self.observed,
                                      teacher=workspace(cfg).teacher.fingerprint, screen=self.screen)
        publish_search_tables(result, cfg.teacher.name, teacher_ms)
        return result

    def screen(self, archs: list[StudentArch]) -> list[float]:
        """An episode's pool scored zero-cost (search.screen), as a task of this flow."""
        return screen_candidates(self.c, [a.name for a in archs])

    def observed(self, o) -> None:
        """Each candidate the search records: logged, and tracked as a child run."""
        get_run_logger().info("episode %d: %s reward %.4f L_HS %.4f %.2f ms", o.episode, o.arch.name, o.reward,
                              o.kd_loss, o.latency_ms)
        if self.parent:
            extra = self._reports.get(o.arch.arch_id, {})
            track_candidate(self.c, self.parent, o.to_dict(), extra.get("report"), extra.get("curve"))

    def final_student(self, arch: str) -> FinalStudent:
        return final_from_dict(final_distill_flow(self.c, arch))

    def evaluate(self, student_paths: list[str]) -> EvaluationTable:
        d = evaluate_students_task(self.c, student_paths, str(search_dir(self.cfg)))
        return EvaluationTable(d["rows"], d["tasks"], {"csv": d["csv"], "md": d["md"]})


@flow(name="kdnas", log_prints=True, validate_parameters=True)
def kdnas(
    config_path: str = DEFAULT_CONFIG,
    overrides: dict[str, Any] | None = None,
    config: KDNASConfig | None = None,
    research: bool = True,
    final: bool = True,
    preflight: bool = True,
) -> dict:
    """Search student architectures for the configured teacher and latency budgets.

    config_path: YAML config; overrides: dotted keys, e.g. {"search.episodes": 2}; config: the
    whole typed config instead of a file (validated by Prefect against its schema); research:
    when this config's search already finished, run a new round warm-started from it (what a
    scheduled re-search does); final: distil and export the recommended students; preflight:
    check tracking, storage and the Dask scheduler first (the CLI has checked them already).
    Returns ``kdnas_core.pipeline.SearchOutcome.to_dict()``.
    """
    logger = get_run_logger()
    cfg = config_from_parameters(config_path, overrides, config)
    if preflight:
        check_services(cfg)  # an unreachable server, bucket or scheduler fails now, not hours in
    steps = PrefectSteps(cfg, research)
    outcome = run_search_job(cfg, steps, final=final)
    phases = Phases()
    phases.seconds = dict(outcome.phases)
    logger.info("time per phase:\n%s", "\n".join(phases.lines()))
    if steps.parent:
        metrics = outcome.evaluation.metrics() if outcome.evaluation else {}
        spool, registered = close_search_run(steps.c, steps.parent, search_dir(cfg), outcome.finals,
                                             outcome.recommendations, metrics)
        finals = {arch: replace(f, registered=registered.get(arch)) for arch, f in outcome.finals.items()}
        outcome = replace(outcome, finals=finals, tracking_run_id=steps.parent, tracking_url=candidates_url(steps.c),
                          tracking_spool=spool)
        if outcome.tracking_url:
            logger.info("candidate runs in the MLflow UI: %s", outcome.tracking_url)
    return outcome.to_dict()


if __name__ == "__main__":
    print(kdnas(config_path=str(Path(DEFAULT_CONFIG))))
