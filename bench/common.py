"""Shared by the benchmarks: every report is printed and kept under runs/bench/."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def publish(name: str, report: str) -> Path:
    print(report)
    out = ROOT / "runs" / "bench" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    return out
