"""Final students: one architecture distilled on the full train split (or the proxy split), saved,
reused while intact, resumed from its checkpoint, and exported to ONNX fp32 and int8."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

from kdnas_core.files.atomic import check_can_write
from kdnas_core.files.checkpoint import remove_checkpoint
from kdnas_core.config import KDNASConfig, LatencyConfig
from kdnas_core.distill import DataParallel, DistillResult, distill
from kdnas_core.errors import ArchError, KdnasError
from kdnas_core.search.candidates import EventLog
from kdnas_core.keys import key
from kdnas_core.latency import export_onnx, quantize_onnx
from kdnas_core.files.lock import exclusive
from kdnas_core.progress import Progress
from kdnas_core.search.space import StudentArch
from kdnas_core.sentence import SentenceHead
from kdnas_core.student import (
    TRAINING_BYTES_PER_PARAM,
    DamagedStudent,
    check_fits_in_memory,
    check_student_destination,
    count_parameters,
    load_sentence_student,
    save_student,
    saved_meta,
    verify_student,
)
from kdnas_core.workspace import Workspace, distill_path


@dataclass(frozen=True)
class FinalStudent:
    """A distilled student saved in ``path``; ``onnx``/``onnx_int8`` once exported."""

    arch: str
    arch_id: str
    path: str
    result: DistillResult  # its distillation, as saved in kdnas_arch.json (no pooled projection)
    world_size: int = 1
    teacher: str | None = None
    params: int | None = None
    teacher_params: int | None = None
    n_texts: int | None = None
    onnx: str | None = None
    onnx_int8: str | None = None
    registered: dict | None = None  # its model in the MLflow registry (name, version, aliases), when tracked

    def exported(self, latency: LatencyConfig) -> FinalStudent:
        files = export_student(self.path, latency)
        return replace(self, onnx=files.onnx, onnx_int8=files.onnx_int8)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(replace(self, result=None)).items() if v is not None}
        return d | {"result": self.result.to_dict()}


@dataclass(frozen=True)
class ExportedFiles:
    """A saved student's ONNX files (``export_student``)."""

    arch: str
    arch_id: str
    onnx: str
    onnx_int8: str

    def to_dict(self) -> dict:
        return asdict(self)


def student_dir(cfg: KDNASConfig, arch: StudentArch) -> Path:
    """Where a student is saved when no folder is given."""
    return cfg.paths.output_path() / "students" / arch.arch_id


def check_student_out(out_dir: Path, name: str | None = None) -> None:
    """Before any work: ``out_dir`` holds nothing of the user's, and a student can be written
    there (its temporary folder and checkpoint go beside it). ``name``: the option that gave it."""
    check_student_destination(out_dir)
    check_can_write(out_dir, name, folder=True)


@contextmanager
def writing_student(out_dir: Path, name: str | None = None) -> Iterator[None]:
    """One writer per student folder, checked before the work: two distillations into one
    folder both said "saved" and the later silently replaced the other's student. The lock
    file sits beside the folder (the folder itself is renamed into place) and goes with its holder."""
    out_dir = Path(out_dir)
    check_student_out(out_dir, name)
    with exclusive(out_dir.parent, f"a distillation into {out_dir}", name=f".{out_dir.name}.kdnas-lock", remove=True):
        yield


def checkpoint_path(cfg: KDNASConfig, out_dir: Path, split: str, max_steps: int | None) -> Path:
    """Next to the student folder, keyed by config: a rerun of the same job resumes from it."""
    return out_dir.with_name(f".{out_dir.name}-{split}-{key('checkpoint', cfg)}-{max_steps or 0}.ckpt")


def distill_student(
    cfg: KDNASConfig,
    arch: str | StudentArch,
    split: str = "train",
    out_dir: Path | None = None,
    max_steps: int | None = None,
    ws: Workspace | None = None,
    progress: Progress = True,
) -> FinalStudent:
    """Distil one architecture on ``split`` and save it (the one entry point of a distillation
    that is kept: ``kdnas distill``, final students, each torchrun process)."""
    arch = StudentArch.from_name(arch) if isinstance(arch, str) else arch
    out_dir = Path(out_dir) if out_dir else student_dir(cfg, arch)
    check_student_out(out_dir)  # a user's folder, or a read-only place, is refused before the work
    ws = ws or Workspace.prepare(cfg).validate()
    ws.space.validate(arch)
    check_fits_in_memory(arch, ws.teacher.config, TRAINING_BYTES_PER_PARAM)  # before the teacher runs
    path = distill_path(split)
    budget = getattr(cfg.distill, path)
    if max_steps:
        budget = budget.model_copy(update={"max_steps": max_steps})
    batches, states, eval_states = ws.distill_inputs(split, budget, arch.layers, progress)
    start = ws.start_student(arch, TRAINING_BYTES_PER_PARAM, cfg.distill.dropout)
    student = start.model
    ckpt = checkpoint_path(cfg, out_dir, split, budget.max_steps)
    result = distill(
        student, states, batches, cfg.distill.recipe(path), budget,
        eval_batches=ws.batches("eval"), eval_states=eval_states, seed=cfg.seed, progress=progress,
        checkpoint=ckpt, checkpoint_every=cfg.distill.checkpoint_every, init_heads=start.init_heads,
        pooling=ws.teacher.head.pooling,
    )
    parallel = DataParallel.active()
    meta = {
        "teacher": cfg.teacher.name,
        "teacher_fingerprint": ws.teacher.fingerprint,
        "split": split,
        "config_hash": key("final", cfg),
        "world_size": parallel.world if parallel else 1,
        "init": "teacher" if ws.inheritance is None else "random",
        "result": result.to_dict(),
    }
    path = out_dir
    if parallel is None or parallel.main:  # every process holds the same weights: one saves
        student, tokenizer, meta["vocab"] = trimmed(cfg, ws, student)
        head = student_head(cfg, ws, result.pooled_projection)
        meta["sentence"] = {"pooling": head.pooling, "normalize": head.normalize, "teacher_space": head.teacher_space}
        path = save_student(student, tokenizer, arch, out_dir, meta, head)
        remove_checkpoint(ckpt)
    return FinalStudent(arch.name, arch.arch_id, str(path), replace(result, pooled_projection=None), meta["world_size"],
                        cfg.teacher.name, count_parameters(student), count_parameters(ws.teacher.model), len(ws.splits.get(split)))


def student_head(cfg: KDNASConfig, ws: Workspace, projection) -> SentenceHead:
    """The student's sentence head: the teacher's pooling and normalisation; with
    ``export.teacher_space`` (default: when the teacher is a sentence-embedding model) also the
    learned pooled projection and the teacher's Dense layers, so it embeds into the teacher's space."""
    t = ws.teacher.head
    head = t.without_dense(cfg.data.max_length)
    wanted = cfg.export.teacher_space if cfg.export.teacher_space is not None else ws.teacher.sentence_head is not None
    return head.with_projection(projection, t) if wanted and projection is not None else head


def trimmed(cfg: KDNASConfig, ws: Workspace, student) -> tuple[object, object, dict | None]:
    """The student and its tokenizer as saved: with ``student.vocab: corpus`` only the tokens of
    the distillation corpus and ``student.vocab_texts`` (see kdnas_core/teachers/vocab.py)."""
    if cfg.student.vocab == "teacher":
        return student, ws.teacher.tokenizer, None
    from kdnas_core.teachers.vocab import trim_to_corpus

    # The held-out eval split is left out: fidelity is measured on it, as on unseen text.
    texts = list(ws.splits.train) + list(ws.splits.proxy)
    if cfg.student.vocab_texts:
        texts += Path(cfg.student.vocab_texts).expanduser().read_text(encoding="utf-8", errors="replace").splitlines()
    return trim_to_corpus(student, ws.teacher.tokenizer, texts, cfg.student.vocab_keep_top)


def final_student(cfg: KDNASConfig, ws: Workspace, arch: StudentArch, log: EventLog | None = None,
                  progress: Progress = True) -> FinalStudent:
    """One final student: kept if already saved for this config, resumed from its checkpoint
    if interrupted, distilled otherwise (the plain loop and the flow's task share this)."""
    folder = student_dir(cfg, arch)
    with writing_student(folder):  # another search of this output_dir may be saving the same arch
        return _final_student(cfg, ws, arch, folder, log or (lambda *a, **k: None), progress)


def _final_student(cfg: KDNASConfig, ws: Workspace, arch: StudentArch, folder: Path, log, progress: Progress
                   ) -> FinalStudent:
    meta = saved_student_meta(folder, log)
    if meta.get("config_hash") == key("final", cfg) and meta.get("split") == "train":
        log("final-reused", arch)
        # killed after saving the student but before removing its checkpoint: tidy up
        remove_checkpoint(checkpoint_path(cfg, folder, "train", cfg.distill.final.max_steps))
        return FinalStudent(arch.name, arch.arch_id, str(folder), DistillResult.from_dict(meta["result"]),
                            meta.get("world_size", 1))
    log("final-start", arch, world_size=cfg.distill.world_size)
    if cfg.distill.world_size > 1:
        ws.distill_inputs("train", cfg.distill.final, arch.layers, progress)  # built once; the processes read them
        launch_torchrun(cfg, arch, folder)
        meta = saved_meta(folder)
        summary = FinalStudent(arch.name, arch.arch_id, str(folder), DistillResult.from_dict(meta["result"]),
                               meta["world_size"])
    else:
        summary = distill_student(cfg, arch, split="train", out_dir=folder, ws=ws, progress=progress)
    log("final-done", arch)
    return summary


def saved_student_meta(folder: Path, log=None) -> dict:
    """The metadata of the student saved in ``folder`` when it is intact; {} when there is none,
    or when it was damaged since it was saved (then it is distilled again, resuming from its
    checkpoint where one is left)."""
    if not folder.is_dir():
        return {}
    try:
        verify_student(folder)
        return saved_meta(folder)
    except DamagedStudent as err:
        warnings.warn(f"{err}; distilling it again")
        if log:
            log("final-damaged", None, folder=str(folder))
        return {}
    except ArchError:
        return {}


def export_student(student_path: str | Path, cfg: LatencyConfig) -> ExportedFiles:
    """ONNX (fp32) and dynamic-int8 ONNX files next to a saved student: token ids and attention
    mask in, the finished sentence embedding out (pooling, teacher-space layer and normalisation
    inside the graph), as ``kdnas embed`` and the registered MLflow model use it."""
    path = Path(student_path)
    model, arch = load_sentence_student(path)
    onnx = export_onnx(model, path / "model.onnx", cfg.opset)
    int8 = quantize_onnx(onnx, path / "model.int8.onnx")
    return ExportedFiles(arch.name, arch.arch_id, str(onnx), str(int8))


def launch_torchrun(cfg: KDNASConfig, arch: StudentArch, out_dir: Path, timeout: float | None = None) -> None:
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
        # The last line torchrun's processes printed is the error; the rest is their traceback.
        last = ((proc.stderr or proc.stdout).strip().splitlines() or [""])[-1]
        raise KdnasError(f"final distillation of {arch.name} on {cfg.distill.world_size} processes failed "
                         f"(torchrun exit {proc.returncode}): {last}")
