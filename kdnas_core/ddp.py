"""The final distillation on several processes: ``torchrun`` launches this module once per
process, each joins the ``torch.distributed`` group and runs the same ``final.distill_student``; the
trainer (``distill.DataParallel``) splits every batch between them and sums their gradients.

gloo on the CPU, NCCL when the processes train on GPUs (one GPU per process, by local rank).
``final.launch_torchrun`` starts it when ``distill.world_size > 1``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from kdnas_core.config import config_from_dict
from kdnas_core.final import distill_student
from kdnas_core.workspace import Workspace


def _backend() -> str:
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def main(argv: list[str] | None = None) -> None:
    import torch
    import torch.distributed as dist

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
        distill_student(cfg, args.arch, split="train", out_dir=Path(args.out), ws=ws, progress=dist.get_rank() == 0)
        dist.barrier()  # nobody exits while rank 0 still saves
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
