"""Thin Prefect tasks around infra.tracking (MLflow). Retries: these talk to a tracking server."""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect import get_run_logger, task

from infra.tracking import Tracker, TrackingError
from kdnas_core.files.atomic import write_json
from kdnas_core.config import KDNASConfig, config_from_dict
from kdnas_core.latency import count_flops
from kdnas_core.final import FinalStudent
from kdnas_core.search.loop import Recommendation
from kdnas_core.search.space import StudentArch

RETRY = dict(retries=2, retry_delay_seconds=5)


@task(name="track-search", **RETRY)
def start_search_run(cfg: dict, search_key: str, teacher_ms: float, info: dict, parent_run_id: str | None) -> str:
    """The search's parent run; a resumed search keeps logging to the run it started."""
    tracker = Tracker(config_from_dict(cfg))
    return parent_run_id or tracker.start_search(search_key, teacher_ms, info)


def _candidate_record(c: KDNASConfig, obs: dict) -> dict:
    """An observation as its MLflow run shows it: with the architecture's fields and FLOPs."""
    arch = StudentArch.from_name(obs["arch"])
    b, s = c.latency.reward_shape
    return {**obs, "arch_dict": arch.to_dict(), "flops_g": count_flops(arch, b, s)["total"] / 1e9,
            "params_m": obs.get("extra", {}).get("params_m")}


@task(name="track-candidate", **RETRY)
def log_candidate(cfg: dict, parent_run_id: str, obs: dict, latency_report: dict | None,
                  loss_curve: list | None) -> str:
    c = config_from_dict(cfg)
    losses = [loss for _, loss in loss_curve] if loss_curve else None
    return Tracker(c).log_candidate(parent_run_id, _candidate_record(c, obs), latency_report, losses)


@task(name="track-results", **RETRY)
def log_search_results(cfg: dict, parent_run_id: str, out_dir: str) -> None:
    Tracker(config_from_dict(cfg)).log_search_results(parent_run_id, Path(out_dir))


@task(name="register-student", **RETRY)
def register_student(cfg: dict, parent_run_id: str, student_dir: str, budgets: list[str], metrics: dict) -> dict:
    return Tracker(config_from_dict(cfg)).register_student(parent_run_id, Path(student_dir), budgets, metrics)


@task(name="track-finish", **RETRY)
def finish_search_run(cfg: dict, parent_run_id: str) -> None:
    Tracker(config_from_dict(cfg)).finish(parent_run_id)


@task(name="track-sync-candidates", **RETRY)
def sync_candidates(cfg: dict, parent_run_id: str, state_path: str) -> int:
    """Log every observation of the search state that has no run yet (a tracking outage during
    the search, or a crash between saving a result and logging it); returns how many."""
    c = config_from_dict(cfg)
    tracker = Tracker(c)
    path = Path(state_path)
    if not path.is_file():
        return 0
    known = tracker.logged_candidates(parent_run_id)
    missing = [o for o in json.loads(path.read_text())["observations"] if o["arch_id"] not in known]
    for obs in missing:
        tracker.log_candidate(parent_run_id, _candidate_record(c, obs))
    return len(missing)


@task(name="track-flush-spool")
def flush_spool(cfg: dict, wait_s: float) -> dict:
    """Upload artifacts spooled during an artifact-store outage, retrying with backoff for up to
    ``wait_s`` seconds; returns what was uploaded, what still waits, and the delay."""
    tracker = Tracker(config_from_dict(cfg))
    start, delay, total = time.monotonic(), 5.0, {"uploaded": 0, "pending": len(tracker.spooled())}
    if not total["pending"]:
        return {**total, "waited_s": 0.0}
    logger = get_run_logger()
    while True:
        r = tracker.flush_spool()
        total = {"uploaded": total["uploaded"] + r["uploaded"], "pending": r["pending"]}
        waited = time.monotonic() - start
        if not r["pending"] or waited >= wait_s:
            break
        logger.warning("artifact store unavailable: %d artifacts spooled in %s (oldest %.0f s); retrying in %.0f s",
                       r["pending"], tracker.spool, r["oldest_pending_s"], delay)
        time.sleep(min(delay, max(0.0, wait_s - waited)))
        delay = min(delay * 2, 60.0)
    return {**total, "waited_s": round(time.monotonic() - start, 1), "spool": str(tracker.spool)}


# ---------------------------------------------------------------- the flow's tracking steps


def open_search_run(cfg: dict, out: Path, teacher_ms: float, info: dict) -> str:
    """The parent run of this search folder: created once (its id kept in ``tracking.json``) and
    reused on resume; artifacts an earlier run spooled are uploaded and candidates it could not
    log are logged from ``state.json``."""
    marker = out / "tracking.json"
    known = json.loads(marker.read_text()) if marker.is_file() else {}
    parent = start_search_run(cfg, out.name, teacher_ms, info, known.get("parent_run_id"))
    write_json(marker, {"parent_run_id": parent})
    flush_spool(cfg, 0)
    sync_candidates(cfg, parent, str(out / "state.json"))
    return parent


def candidates_url(cfg: dict) -> str:
    """Where the experiment's candidate runs open in the MLflow UI, as a table with their reward,
    KD loss, latency and size (a view kdnas saves in the experiment)."""
    return Tracker(config_from_dict(cfg)).candidates_url()


def track_candidate(cfg: dict, parent: str, obs: dict, report: dict | None, curve: list | None) -> None:
    """One candidate's run; when the server is away the result stays safe in ``state.json`` and
    is synced at the end of the search (or by the next run)."""
    try:
        log_candidate(cfg, parent, obs, report, curve)
    except Exception as err:  # noqa: BLE001 - synced later, see above
        get_run_logger().warning("tracking unavailable for %s (%s); it is synced at the end of the search",
                                 obs["arch"], err)


def close_search_run(cfg: dict, parent: str, out: Path, finals: dict[str, FinalStudent],
                     recommendations: list[Recommendation], metrics: dict[str, dict]) -> tuple[dict, dict[str, dict]]:
    """Register the final students (an alias per budget), sync candidates and results, upload
    what was spooled during an outage and close the parent run; the spool's account and each
    student's registered model. The tracking server may have gone away during the search: every
    result is already on disk, so one clear failure and a rerun that syncs is all that is
    needed; nothing is redone then."""
    c = config_from_dict(cfg)
    registered: dict[str, dict] = {}
    try:
        for arch, f in finals.items():
            chosen_for = [r.budget for r in recommendations if r.arch == arch]
            numbers = {k: v for k, v in f.result.to_dict().items() if isinstance(v, (int, float))} | metrics.get(arch, {})
            registered[arch] = register_student(cfg, parent, f.path, chosen_for, numbers)
        sync_candidates(cfg, parent, str(out / "state.json"))
        log_search_results(cfg, parent, str(out))
    except Exception as err:  # noqa: BLE001 - say what is safe and how to finish
        raise TrackingError(f"tracking server unavailable at the end of the search ({type(err).__name__}); nothing "
                            f"is lost: results are complete in {out} and the students under "
                            f"{c.paths.output_path() / 'students'}; rerun the same command when it is back to "
                            "sync them") from err
    spool = flush_spool(cfg, c.tracking.spool_wait_s)
    if spool["uploaded"]:
        get_run_logger().warning("artifact store outage: %d artifacts uploaded %.0f s late, none lost",
                                 spool["uploaded"], spool["waited_s"])
    if spool["pending"]:
        raise TrackingError(f"artifact store still unavailable after {spool['waited_s']:.0f} s: {spool['pending']} "
                            f"artifacts are kept in {spool['spool']} and are uploaded by the next run of this search")
    finish_search_run(cfg, parent)
    return spool, registered
