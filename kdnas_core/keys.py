"""Every cache key kdnas uses, each built from the config sections its result depends on.

A key that misses a section silently reuses a stale result; a key with a section too many
redoes work for nothing. So the sections of every key are listed here and nowhere else, and
``tests/core/test_keys.py`` changes every config field in turn and checks exactly which keys
move. A field in no key must be listed in ``NO_KEY`` with the reason it cannot change a result.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from kdnas_core.config import KDNASConfig

# The code's recipe, in the keys of what training produced: bump it when a code change (not a
# config change) makes a cached student, checkpoint or proxy loss differ from what this code
# would produce, so that a rerun trains again instead of reusing it. 2: projection heads towards
# teacher layers a student was not cut from start at zero; heads no wider than the teacher's.
RECIPE = 2


@dataclass(frozen=True)
class Key:
    sections: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    why: str = ""
    trained: bool = False  # a result of training: keyed by RECIPE too
    # Bumped when what is cached under this key gains content (a new field of the result), so
    # that no older entry without it is read back; other keys stay valid.
    version: int = 0

    def of(self, cfg: KDNASConfig) -> str:
        h = cfg.section_hash(*self.sections, exclude=self.exclude)
        h = hashlib.sha1(f"{h}/recipe-{RECIPE}".encode()).hexdigest()[:12] if self.trained else h
        return hashlib.sha1(f"{h}/v{self.version}".encode()).hexdigest()[:12] if self.version else h


# Fields that change the final students but not the search: a new final budget reuses the search.
# A final student's vocabulary is trimmed after its distillation, so it changes nothing before.
TRIM = ("student.vocab", "student.vocab_texts", "student.vocab_keep_top")
NOT_SEARCH = ("distill.final", "distill.checkpoint_every", "distill.world_size", *TRIM)

KEYS: dict[str, Key] = {
    # One teacher, one set of splits and tokenised texts per process (tasks on worker threads share it).
    "workspace": Key(("seed", "teacher", "data", "search_space", "student", "distill", "paths"), exclude=TRIM,
                     why="the loaded teacher, splits and cached states of a process"),
    # A candidate's proxy distillation (Prefect's task cache and the flow's evaluator).
    # Version 1: the result carries the trained student's quality signals (reward.quality).
    # Version 2: L_HS reads the transformer layers only (kdnas_core.search.reward.l_hs).
    # Version 3: the signals carry hidden_last.
    "proxy": Key(("seed", "teacher", "data", "search_space", "student", "distill"), exclude=NOT_SEARCH,
                 why="the KD loss and quality signals of one proxy distillation", trained=True, version=3),
    # A candidate's latency measurement (Prefect's task cache).
    "latency": Key(("teacher", "student", "latency"), exclude=TRIM, why="one candidate's measured latency (of the student's model class)"),
    # The latency of the teacher, and of students of its vocabulary, on this hardware.
    "latency_settings": Key(("latency",), why="how latency is measured"),
    # A final student: saved once, reused by every rerun of any search with the same recipe.
    "final": Key(("seed", "teacher", "data", "student", "distill", "export"), exclude=("distill.world_size",),
                 why="a final student's weights and sentence head (not how many processes trained it)", trained=True),
    # A final distillation's checkpoint (next to its student folder).
    "checkpoint": Key(("seed", "teacher", "data", "student", "distill"), exclude=TRIM, why="a resumable training run",
                      trained=True),
    # The search folder: re-running the same config resumes it. Version 1: L_HS as the proxy key's version 2.
    "search": Key(("seed", "teacher", "data", "search_space", "student", "distill", "latency", "reward", "controller",
                   "search"),
                  exclude=NOT_SEARCH, why="the search's observations, controller and tables", trained=True, version=1),
}

# Sections and fields in no key, and why none of them can change a cached result.
NO_KEY = {
    "runner": "where candidates run: every runner gives the same results (tested in tests/integration/test_dask_runner.py)",
    "tracking": "what is logged to MLflow, not what is computed",
    "evaluate": "downstream evaluation is not cached by config: embeddings are cached by model weights and texts",
}


def key(name: str, cfg: KDNASConfig) -> str:
    return KEYS[name].of(cfg)
