"""Tables and plots people look at: the leaderboard, Pareto front and recommendations."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from kdnas_core.files.atomic import write_text
from kdnas_core.search.loop import SUMMARY_COLUMNS, SearchResult
from kdnas_core.search.space import StudentArch


def recommendations_frame(result: SearchResult) -> pd.DataFrame:
    """One row per budget (recommendations.csv; report.md and Prefect's artifact show it without
    the arch_id column)."""
    return pd.DataFrame([r.to_dict() for r in result.recommendations])


def write_search_tables(result: SearchResult, out: Path, teacher_ms: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "leaderboard.csv", result.leaderboard.to_csv(index=False))
    write_text(out / "pareto.csv", result.pareto.to_csv(index=False))
    recs = recommendations_frame(result)
    write_text(out / "recommendations.csv", recs.to_csv(index=False))
    cols = SUMMARY_COLUMNS
    md = [f"# KD-NAS search\n\nteacher latency: {teacher_ms:.2f} ms\n", *predictor_lines(result.leaderboard),
          "## Leaderboard\n",
          markdown_table(result.leaderboard[cols]), "\n## Pareto front (KD loss vs latency)\n",
          markdown_table(result.pareto[cols]), "\n## Recommendations per budget\n",
          markdown_table(recs.drop(columns=["arch_id"])), ""]
    write_text(out / "report.md", "\n".join(md))
    pareto_plot(result, out / "pareto.png")


def predictor_lines(lb: pd.DataFrame) -> list[str]:
    """How far the latency each candidate was expected to have (when it was proposed, from the
    measurements before it) lay from what was measured: overall, and on wide and deep students,
    where a predictor fitted on few points errs most."""
    if "predicted_latency_ms" not in lb or lb["predicted_latency_ms"].isna().all():
        return []
    ok = lb.dropna(subset=["predicted_latency_ms"])
    ok = ok[ok["latency_ms"] > 0]
    err = (ok["predicted_latency_ms"] - ok["latency_ms"]).abs() / ok["latency_ms"]
    arch = ok["arch"].map(StudentArch.from_name)
    parts = [f"median {err.median():.0%} over {len(ok)} candidates"]
    for label, mask in (("wide (hidden >= 512)", arch.map(lambda a: a.hidden >= 512)),
                        ("deep (layers >= 6)", arch.map(lambda a: a.layers >= 6))):
        if mask.any():
            parts.append(f"{label} {err[mask].median():.0%} over {int(mask.sum())}")
    return [f"latency predictor error when each candidate was proposed: {'; '.join(parts)}\n"]


def pareto_plot(result: SearchResult, path: Path) -> Path:
    """Latency vs KD loss of every candidate, the Pareto front, each budget as a vertical line
    and the student recommended for it circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lb, front = result.leaderboard, result.pareto
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(lb["latency_ms"], lb["kd_loss"], s=18, c="tab:gray", label="candidates")
    ax.plot(front["latency_ms"], front["kd_loss"], "-o", c="tab:blue", ms=5, label="Pareto front")
    for i, rec in enumerate(result.recommendations):
        color = f"C{(i + 1) % 10}"
        ax.axvline(rec.budget_ms, ls="--", lw=1, c=color, label=f"budget {rec.budget}")
        if rec.arch:
            ax.scatter([rec.latency_ms], [rec.kd_loss], s=160, facecolors="none", edgecolors=color, lw=2)
            ax.annotate(rec.arch, (rec.latency_ms, rec.kd_loss), fontsize=7, xytext=(4, 6), textcoords="offset points")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("normalised KD loss L_HS (lower is better)")
    ax.set_title("KD-NAS candidates")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown_table(df: pd.DataFrame) -> str:
    def cell(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)
