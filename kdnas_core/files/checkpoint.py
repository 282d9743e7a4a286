"""Training checkpoints without pickle: tensors in safetensors files, everything else in JSON.

A checkpoint is a folder written next to its final place and renamed into it, so a crash
(even kill -9) leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kdnas_core.files.atomic import commit_dir, discard_partial, disk_full_is_one_line, partial_dir, remove_stale_partials
from kdnas_core.errors import KdnasError


class UnusableCheckpoint(KdnasError):
    pass


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share storage (tied weights)
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


def save_checkpoint(folder: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
                    scheduler, info: dict) -> Path:
    folder = Path(folder)
    tmp = partial_dir(folder.parent, f".{folder.name}-")
    try:
        with disk_full_is_one_line(folder, "a training checkpoint"):
            for name, module in modules.items():
                save_file(_tensors(module), str(tmp / f"{name}.safetensors"))
            index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
            opt = {f"{index[id(p)]}.{k}": v.detach().clone().contiguous()
                   for p, st in optimizer.state.items() for k, v in st.items() if torch.is_tensor(v)}
            opt["rng.torch"] = torch.get_rng_state()
            save_file(opt, str(tmp / "optimizer.safetensors"))
            groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
            sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
            (tmp / "state.json").write_text(json.dumps({"info": info, "param_groups": groups, "scheduler": sched}))
        old = folder.with_name(f".{folder.name}.old")
        if folder.exists():
            folder.rename(old)
        commit_dir(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        discard_partial(tmp)
        raise
    return folder


def find_checkpoint(folder: Path) -> Path | None:
    """The latest complete checkpoint: the folder, or the previous one if a crash came between
    the two renames of ``save_checkpoint``. Temporary folders of a save that was killed midway
    are removed."""
    folder = Path(folder)
    remove_stale_partials(folder.parent, f".{folder.name}-")
    for f in (folder, folder.with_name(f".{folder.name}.old")):
        if (f / "state.json").is_file():
            return f
    return None


def load_checkpoint(folder: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer, scheduler) -> dict:
    """Restore modules, optimiser moments, scheduler and torch RNG in place; returns ``info``."""
    # Everything is read before anything is applied: a damaged checkpoint leaves the modules as
    # they were, so the caller can start over with them.
    try:
        state = json.loads((folder / "state.json").read_text())
        weights = {name: load_file(str(folder / f"{name}.safetensors")) for name in modules}
        tensors = load_file(str(folder / "optimizer.safetensors"))
        for name, module in modules.items():
            module.load_state_dict(weights[name])
    except Exception as err:  # noqa: BLE001 - safetensors, torch and json each raise their own types
        raise UnusableCheckpoint(f"{folder}: unusable checkpoint ({type(err).__name__}: "
                                 f"{(str(err).splitlines() or [''])[0]})") from None
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for key, value in tensors.items():
        if key == "rng.torch":
            continue
        i, name = key.split(".", 1)
        optimizer.state[params[int(i)]][name] = value.to(params[int(i)].device)
    for group, saved in zip(optimizer.param_groups, state["param_groups"]):
        group.update(saved)
    scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    torch.set_rng_state(tensors["rng.torch"])
    return state["info"]


def remove_checkpoint(folder: Path) -> None:
    folder = Path(folder)
    for f in (folder, folder.with_name(f".{folder.name}.old")):
        shutil.rmtree(f, ignore_errors=True)
