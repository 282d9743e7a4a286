"""The final distillation on several processes: ``torchrun`` launches this module once per
process, each joins the ``torch.distributed`` group and runs the same ``distill_one``; the
trainer (``distill.DataParallel``) splits every batch between them and sums their gradients.

gloo on the CPU, NCCL when the processes train on GPUs (one GPU per process, by local rank).
``launch`` is what the final-distillation step calls when ``distill.world_size > 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from kdnas_core.config import KDNASConfig, config_from_dict
from kdnas_core.errors import KdnasError
from kdnas_core.search_space import StudentArch


def launch(cfg: KDNASConfig, arch: StudentArch, out_dir: Path, timeout: float | None = None) -> None:
    """Run ``torchrun --standalone --nproc_per_node=<distill.world_size>`` on this machine and
    wait; the student lands in ``out_dir`` (written by rank 0, renamed into place)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".ddp-") as tmp:
        config = Path(tmp) / "config.json"
        config.write_text(json.dumps(cfg.model_dump(mode="json")))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={cfg.distill.world_size}", "-m", "kdnas_core.ddp",
               "--config", str(config), "--arch", arch.name, "--out", str(out_dir)]
        # torchrun gives each process one thread unless told otherwise: right when processes
        # share the cores of one machine, as here.
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise KdnasError(f"final distillation of {arch.name} on {cfg.distill.world_size} processes failed "
                         f"(torchrun exit {proc.returncode}):\n{tail}")


def _backend() -> str:
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def main(argv: list[str] | None = None) -> None:
    import torch
    import torch.distributed as dist

    from kdnas_core.recipes import Workspace, distill_one

    ap = argparse.ArgumentParser(prog="kdnas_core.ddp", description="one process of a torchrun final distillation")
    ap.add_argument("--config", required=True)
    ap.add_argument("--arch", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    backend = _backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    try:
        cfg = config_from_dict(json.loads(Path(args.config).read_text()), args.config)
        ws = Workspace.prepare(cfg).validate()
        distill_one(cfg, args.arch, split="train", out_dir=Path(args.out), ws=ws, progress=dist.get_rank() == 0)
        dist.barrier()  # nobody exits while rank 0 still saves
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
