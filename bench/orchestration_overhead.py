"""Benchmark: what Prefect orchestration costs on top of the plain core search loop.

The same small search (embedded default, smaller budgets) runs twice in one process, side by
side: once as kdnas_core's plain ``run_search`` loop, once as the Prefect flow ``kdnas``
(ephemeral API, task cache refreshed so every candidate really runs). Both start from an empty
results folder and reuse the same cached teacher states. The overhead is reported as a ratio,
with the ephemeral API's one-off start-up shown separately.

Run:  python -m bench.orchestration_overhead [--episodes 2] [--k 3]
      python -m bench.orchestration_overhead --smoke   # a tiny random teacher, 1 episode x 2 candidates
Writes runs/bench/orchestration_overhead.md.
"""

from __future__ import annotations

from bench.common import (
    ROOT,
    RUNS_BENCH,
    flow_bench_env,
    header,
    publish,
    search_size_args,
    smoke_config,
)

flow_bench_env()

import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import yaml  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    args = search_size_args(argv, __doc__.splitlines()[0], RUNS_BENCH, k=3)

    from kdnas_core.config import load_config
    from kdnas_core.latency import predictor_path
    from kdnas_core.pipeline import search_without_prefect

    tmp = Path(tempfile.mkdtemp(prefix="kdnas-orch-"))
    data = smoke_config(tmp / "smoke") if args.smoke else yaml.safe_load((ROOT / "configs/default.yaml").read_text())
    data["search"] = {"episodes": args.episodes, "candidates_per_episode": args.k}
    data["paths"]["output_dir"] = str(tmp / "runs")
    cfg_path = tmp / "bench.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    cfg = load_config(cfg_path)

    # Warm both paths alike: teacher states and teacher latency cached before either is timed.
    search_without_prefect(cfg.model_copy(update={"search": cfg.search.model_copy(update={"episodes": 1, "candidates_per_episode": 1})}),
                     fresh=True, progress=False)

    # Each search refits the saved latency predictor, which steers the next search's pool:
    # both runs start from the same predictor so that they evaluate the same candidates.
    pred = predictor_path(cfg.paths.cache_path(), cfg.latency)
    saved = pred.read_bytes() if pred.is_file() else None

    def restore_predictor() -> None:
        if saved is None:
            pred.unlink(missing_ok=True)
        else:
            pred.write_bytes(saved)

    shutil.rmtree(tmp / "runs", ignore_errors=True)
    t0 = time.perf_counter()
    plain, _, _ = search_without_prefect(cfg, fresh=True, progress=False)
    plain_s = time.perf_counter() - t0
    shutil.rmtree(tmp / "runs", ignore_errors=True)
    restore_predictor()

    from prefect import flow

    @flow
    def noop() -> None:  # starts the ephemeral API once, timed on its own
        return None

    t0 = time.perf_counter()
    noop()
    startup_s = time.perf_counter() - t0

    from flows.search import kdnas

    t0 = time.perf_counter()
    out = kdnas(config_path=str(cfg_path), research=False, final=False)
    flow_s = time.perf_counter() - t0
    import json

    flow_archs = [o["arch"] for o in json.loads((Path(out["search_dir"]) / "state.json").read_text())["observations"]]
    plain_archs = [o.arch.name for o in plain.observations]
    assert flow_archs == plain_archs, ("the two runs evaluated different candidates", plain_archs, flow_archs)

    overhead = flow_s / plain_s - 1
    report = "\n".join([
        *header("Orchestration overhead: the plain loop vs the Prefect flow", __file__, argv, cfg),
        "",
        f"orchestration overhead: {args.episodes} episodes x {args.k} candidates, "
        f"{'a tiny random teacher' if args.smoke else 'embedded default'}",
        "",
        "| run | seconds |",
        "|---|---:|",
        f"| plain core loop | {plain_s:.1f} |",
        f"| Prefect flow (ephemeral API already up) | {flow_s:.1f} |",
        f"| ephemeral API start-up (once per process) | {startup_s:.1f} |",
        "",
        f"overhead of the flow: {100 * overhead:+.1f} % (target <= 5 %); "
        f"with start-up: {100 * ((flow_s + startup_s) / plain_s - 1):+.1f} %",
        "",
    ])
    out = publish(report, args.out / "orchestration_overhead.md")
    shutil.rmtree(tmp, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
