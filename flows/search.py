"""The KD-NAS search as a Prefect flow: flow ``kdnas``, deployment ``search``.

Control flow only: the episode loop is kdnas_core's ``run_search``; here each episode's
candidates fan out as ``profile-latency`` and ``proxy-distill`` tasks (at most
``search.max_parallel`` at once, or over a Dask cluster with ``runner.kind: dask``), and the
chosen students go through a ``final-distill`` subflow. Results land in
``<paths.output_dir>/search/<config hash>/`` and as Prefect artifacts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from kdnas_core.atomic import write_json
from kdnas_core.config import KDNASConfig, apply_overrides, config_from_dict, load_config
from kdnas_core.recipes import EventLog, RecordedEvaluator, markdown_table, search_dir, search_in_folder
from kdnas_core.search import SUMMARY_COLUMNS, Evaluation
from kdnas_core.search_space import StudentArch
from infra.dask_runner import dask_cluster, task_runner
from infra.dask_runner import preflight as runner_preflight
from infra.dask_runner import resources as dask_resources
from infra.storage import check_access
from infra.tracking import TrackingError, preflight
from tasks.tracking_tasks import (
    finish_search_run,
    flush_spool,
    log_candidate,
    log_search_results,
    register_student,
    start_search_run,
    sync_candidates,
)
from tasks.search_tasks import (
    evaluate_students_task,
    export_onnx_task,
    final_distill,
    prepare_teacher_states,
    profile_latency,
    proxy_distill,
    teacher_latency_ms,
    workspace,
)

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


def _tracking_run(cfg: KDNASConfig, c: dict, out: Path, teacher_ms: float, prep: dict) -> str:
    """The parent MLflow run of this search folder, created once and reused on resume."""
    marker = out / "tracking.json"
    known = json.loads(marker.read_text()) if marker.is_file() else {}
    info = {"splits_fingerprint": workspace(cfg).splits.fingerprint, **prep}
    parent = start_search_run(c, out.name, teacher_ms, info, known.get("parent_run_id"))
    write_json(marker, {"parent_run_id": parent})
    return parent


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


@flow(name="kdnas", log_prints=True, validate_parameters=True)
def kdnas(
    config_path: str = DEFAULT_CONFIG,
    overrides: dict[str, Any] | None = None,
    config: KDNASConfig | None = None,
    research: bool = True,
    final: bool = True,
) -> dict:
    """Search student architectures for the configured teacher and latency budgets.

    config_path: YAML config; overrides: dotted keys, e.g. {"search.episodes": 2}; config: the
    whole typed config instead of a file (validated by Prefect against its schema); research:
    when this config's search already finished, run a new round warm-started from it (what a
    scheduled re-search does); final: distil and export the recommended students.
    """
    logger = get_run_logger()
    if config is not None:
        cfg = config_from_dict(apply_overrides(config.model_dump(mode="json"), overrides), "config parameter")
    else:
        cfg = load_config(config_path, overrides)
    c = cfg.model_dump(mode="json")
    if cfg.tracking.enabled:
        preflight(cfg)  # an unreachable server or unwritable bucket fails now, not hours in
    if cfg.paths.shared_cache:
        check_access(cfg.paths.shared_cache, field="paths.shared_cache")
    runner_preflight(cfg.runner)  # an unreachable Dask scheduler, before the teacher runs
    prep = prepare_teacher_states(c)
    teacher_ms = teacher_latency_ms(c)
    logger.info("teacher %s: %.2f ms; proxy cache %s", cfg.teacher.name, teacher_ms, prep["proxy_cache"])

    out = search_dir(cfg)
    parent = _tracking_run(cfg, c, out, teacher_ms, prep) if cfg.tracking.enabled else None
    if parent:
        flush_spool(c, 0)  # artifacts an earlier run could not upload
        sync_candidates(c, parent, str(out / "state.json"))
    reports: dict[str, dict] = {}
    curves: dict[str, list] = {}

    def evaluate_batch(archs: list[StudentArch]) -> list[Evaluation]:
        if dask_address is None:
            calls = [(profile_latency, (c, a.name)) for a in archs] + [(proxy_distill, (c, a.name)) for a in archs]
            res = _in_waves(calls, cfg.search.max_parallel)
            lat, kd = res[: len(archs)], res[len(archs):]
        else:
            # Latency first, here, one at a time, while the workers are idle: every candidate is
            # timed on the same machine and never next to a distillation on the same cores.
            lat = _in_waves([(profile_latency, (c, a.name)) for a in archs], 1)
            kd = evaluate_candidates.with_options(task_runner=task_runner(dask_address))(
                c, [a.name for a in archs], dict(cfg.runner.resources))
        out = []
        for a, l, k in zip(archs, lat, kd):
            err = next((x for x in (k, l) if isinstance(x, BaseException)), None)
            if err is not None:
                logger.warning("candidate %s failed: %s", a.name, err)
                out.append(Evaluation.failure(err))
                continue
            reports[a.arch_id], curves[a.arch_id] = l["report"], k.get("loss_curve")
            out.append(Evaluation(k["kd_loss"], l["latency_ms"], {x: v for x, v in k.items() if x not in ("kd_loss", "loss_curve")}))
        return out

    def on_observation(o) -> None:
        logger.info("episode %d: %s reward %.4f L_HS %.4f %.2f ms", o.episode, o.arch.name, o.reward, o.kd_loss, o.latency_ms)
        if parent:
            try:
                log_candidate(c, parent, o.to_dict(), reports.get(o.arch.arch_id), curves.get(o.arch.arch_id))
            except Exception as err:  # noqa: BLE001 - the result is safe in state.json; synced below
                logger.warning("tracking unavailable for %s (%s); it is synced at the end of the search", o.arch.name, err)

    # evals/ and events.jsonl as in the plain loop: a killed flow resumes without sending a
    # recorded candidate out again, even where Prefect's own result cache is not shared.
    recorded = RecordedEvaluator.batch(evaluate_batch, out, EventLog(out))
    with dask_cluster(cfg.runner) as dask_address:
        if dask_address:
            logger.info("candidates fan out over the Dask cluster at %s", dask_address)
        result = search_in_folder(cfg, workspace(cfg).space, teacher_ms, evaluate_batch=recorded, research=research,
                                  on_observation=on_observation, teacher=workspace(cfg).teacher.fingerprint)
    create_markdown_artifact(markdown_table(result.leaderboard[SUMMARY_COLUMNS]), key="kdnas-leaderboard",
                             description=f"KD-NAS leaderboard ({cfg.teacher.name}, {teacher_ms:.2f} ms)")
    recs = result.recommendations
    create_markdown_artifact(markdown_table(pd.DataFrame(recs).drop(columns=["arch_id"])),
                             key="kdnas-recommendations", description="best student per latency budget")

    finals: dict[str, dict] = {}
    evaluation: dict | None = None
    if final:
        for arch in dict.fromkeys(r["arch"] for r in recs if r["arch"]):
            finals[arch] = final_distill_flow(c, arch)
        if finals and cfg.evaluate.enabled:
            evaluation = evaluate_students_task(c, [f["path"] for f in finals.values()], str(out))
            create_markdown_artifact(Path(evaluation["md"]).read_text(), key="kdnas-evaluation",
                                     description="downstream quality of the final students")
    spool = None
    if parent:
        # The tracking server may have gone away during the search: every result is already on
        # disk (state.json, evals/, students/), so one clear failure and a rerun that syncs is
        # all that is needed; nothing is redone then (evaluations and finals are reused).
        try:
            for arch, f in finals.items():
                chosen_for = [r["budget"] for r in recs if r["arch"] == arch]
                metrics = {k: v for k, v in f["result"].items() if isinstance(v, (int, float))}
                metrics |= (evaluation or {}).get("metrics", {}).get(arch, {})
                f["registered"] = register_student(c, parent, f["path"], chosen_for, metrics)
            sync_candidates(c, parent, str(out / "state.json"))
            log_search_results(c, parent, str(out))
        except Exception as err:  # noqa: BLE001 - say what is safe and how to finish
            raise TrackingError(f"tracking server unavailable at the end of the search ({type(err).__name__}); nothing "
                                f"is lost: results are complete in {out} and the students under "
                                f"{cfg.paths.output_path() / 'students'}; rerun the same command when it is back to "
                                "sync them") from err
        spool = flush_spool(c, cfg.tracking.spool_wait_s)
        if spool["uploaded"]:
            logger.warning("artifact store outage: %d artifacts uploaded %.0f s late, none lost", spool["uploaded"], spool["waited_s"])
        if spool["pending"]:
            raise TrackingError(f"artifact store still unavailable after {spool['waited_s']:.0f} s: {spool['pending']} artifacts "
                                f"are kept in {spool['spool']} and are uploaded by the next run of this search")
        finish_search_run(c, parent)
    return {
        "tracking_run_id": parent,
        "search_dir": str(out),
        "teacher_ms": teacher_ms,
        "evaluated": len(result.observations),
        "best": result.best.arch.name if result.best else None,
        "recommendations": recs,
        "final": finals,
        "evaluation": evaluation["rows"] if evaluation else None,
        "tracking_spool": spool,
    }


if __name__ == "__main__":
    print(kdnas(config_path=str(Path(DEFAULT_CONFIG))))
