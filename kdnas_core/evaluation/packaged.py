"""Evaluation data sets that install from Debian or PyPI packages, so evaluating a student needs
no model hub and no network.

Each set has one of three kinds, and the kind fixes its columns:

- ``retrieval``: ``query``, ``positive``; each query is ranked against the pool of all positives,
  so every query and every positive text appears once (a repeated text would have several
  equally right answers);
- ``similarity``: ``text1``, ``text2``, ``score`` (human grades; Spearman of cosine vs score);
- ``clustering``: ``text``, ``label`` (V-measure of k-means).

Extraction runs once per set and version: the rows are cached as
``<cache_dir>/packaged/<name>-v<version>.csv`` and every later call reads that file.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from kdnas_core.files.atomic import write_text
from kdnas_core.errors import DataError

COLUMNS = {
    "retrieval": ("query", "positive"),
    "similarity": ("text1", "text2", "score"),
    "clustering": ("text", "label"),
}


@dataclass(frozen=True)
class PackagedSet:
    name: str
    kind: str
    description: str
    licence: str
    origin: str
    install: str
    # Part of the cache file's name: bump it whenever the extraction changes its rows.
    version: int = 1


class PackagedDataMissing(DataError, ValueError):
    """The package that holds a set is not installed; the message names the install command."""


class UnknownPackagedSet(DataError, ValueError):
    pass


def _package_dir(module: str, *inner: str) -> Path | None:
    # find_spec locates a package without importing it (gensim's import takes seconds).
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0]).joinpath(*inner)


# Where the packages put their data; tests point these elsewhere to play "not installed".
SWORD_DIR = Path("/usr/share/sword")
DIATHEKE = "diatheke"
CHATTERBOT_DATA = _package_dir("chatterbot_corpus", "data", "english")
GENSIM_TEST_DATA = _package_dir("gensim", "test", "test_data")

LOCALE_DIR = Path("/usr/share/locale")
# Message catalogues (gettext domains) read for the gettext-<lang> sets, in this order; their
# Debian packages are small and installed by infra/install-data.sh.
GETTEXT_DOMAINS = ("coreutils", "bash", "tar", "grep", "sed", "findutils", "diffutils", "dpkg", "libc", "apt",
                   "libapt-pkg6.0", "git", "gettext-runtime", "gnupg2", "wget", "make", "xz", "procps-ng", "psmisc",
                   "man-db")
GETTEXT_PACKAGES = ("coreutils", "bash", "tar", "grep", "sed", "findutils", "diffutils", "dpkg", "libc-l10n", "apt",
                    "git", "gettext-base", "gnupg-l10n", "wget", "make", "xz-utils", "procps", "psmisc", "man-db")
GETTEXT_LANGUAGES = {"de": "German", "fr": "French", "es": "Spanish", "it": "Italian", "pt_BR": "Brazilian Portuguese",
                     "nl": "Dutch", "sv": "Swedish", "pl": "Polish", "cs": "Czech", "ru": "Russian", "uk": "Ukrainian",
                     "tr": "Turkish", "vi": "Vietnamese", "zh_CN": "Simplified Chinese", "ja": "Japanese",
                     "ko": "Korean"}

KJV, WEB, RV1909 = "engKJV2006eb", "engWEB2015eb", "spaRV1909eb"
_SWORD_PACKAGES = {KJV: "sword-text-kjv", WEB: "sword-text-web", RV1909: "sword-text-sparv"}

PACKAGED: dict[str, PackagedSet] = {s.name: s for s in (
    PackagedSet(
        "bible-paraphrase", "retrieval",
        "English Bible verses (KJV, 1769) paired with the same verse in modern English (WEB)",
        "public domain (KJV, WEB)",
        "Debian sword-text-kjv + sword-text-web (CrossWire SWORD modules of eBible.org texts), read with diatheke",
        "apt-get install sword-text-kjv sword-text-web diatheke"),
    PackagedSet(
        "bible-es-en", "retrieval",
        "English Bible verses (KJV) paired with the same verse in Spanish (Reina-Valera 1909)",
        "public domain (KJV, RV1909)",
        "Debian sword-text-kjv + sword-text-sparv (CrossWire SWORD modules of eBible.org texts), read with diatheke",
        "apt-get install sword-text-kjv sword-text-sparv diatheke"),
    PackagedSet(
        "chatterbot-qa", "retrieval",
        "first utterance -> reply of each English chatbot training conversation",
        "BSD-3-Clause (chatterbot-corpus)",
        "PyPI chatterbot-corpus 1.3.3 (github.com/gunthercox/chatterbot-corpus), data/english/*.yml",
        "pip install chatterbot-corpus==1.3.3"),
    PackagedSet(
        "chatterbot-topics", "clustering",
        "English chatbot utterances labelled by topic file (ai, food, money, trivia, ...)",
        "BSD-3-Clause (chatterbot-corpus)",
        "PyPI chatterbot-corpus 1.3.3 (github.com/gunthercox/chatterbot-corpus), data/english/*.yml",
        "pip install chatterbot-corpus==1.3.3"),
    *[PackagedSet(
        f"gettext-{lang}", "retrieval",
        f"English user-interface messages of GNU and Debian command-line tools paired with their {name} translation",
        "each package's own (GPL-2+/GPL-3+/LGPL-2.1+: coreutils, bash, tar, grep, sed, findutils, diffutils, dpkg, "
        "glibc, apt, git, gettext, gnupg, wget, make, xz, procps, psmisc, man-db)",
        "the message catalogues (/usr/share/locale/<lang>/LC_MESSAGES/<domain>.mo) of Debian packages that "
        "infra/install-data.sh installs",
        f"apt-get install --reinstall {' '.join(GETTEXT_PACKAGES)}") for lang, name in GETTEXT_LANGUAGES.items()],
    PackagedSet(
        "lee-similarity", "similarity",
        "pairs of 50 news documents graded for similarity by people (Lee, Pincombe & Welsh 2005)",
        "no licence of its own: given to gensim (LGPL-2.1) by its author, M. D. Lee",
        "PyPI gensim 4.4.0, gensim/test/test_data/lee.cor + similarities0-1.txt",
        "pip install gensim==4.4.0"),
)}


def load_packaged(name: str, cache_dir: Path) -> pd.DataFrame:
    """The rows of a packaged set, in a fixed order; extracted once, then read from the cache."""
    spec = PACKAGED.get(name)
    if spec is None:
        raise UnknownPackagedSet(f"unknown packaged data set {name!r}; known: {', '.join(PACKAGED)}")
    path = Path(cache_dir) / "packaged" / f"{name}-v{spec.version}.csv"
    if not path.is_file():
        frame = _EXTRACTORS[name]()
        write_text(path, frame.to_csv(index=False))
    return _read_cache(path, spec.kind)


def _read_cache(path: Path, kind: str) -> pd.DataFrame:
    columns = COLUMNS[kind]
    types = {c: ("float64" if c == "score" else str) for c in columns}
    # na_filter off: a text such as "None" or "NA" stays a text.
    frame = pd.read_csv(path, dtype=types, na_filter=False)
    if tuple(frame.columns) != columns:
        raise DataError(f"{path}: columns {list(frame.columns)}, expected {list(columns)}; delete the file to rebuild it")
    return frame


def _missing(name: str, what: str) -> PackagedDataMissing:
    return PackagedDataMissing(
        f"packaged data set {name!r} needs {what}, which is not installed; install it with: {PACKAGED[name].install}")


def _unique_pairs(pairs: list[tuple[str, str]]) -> pd.DataFrame:
    """Retrieval rows in which no query and no positive repeats (the first pair keeps a text)."""
    seen_q, seen_p, rows = set(), set(), []
    for q, p in pairs:
        if q and p and q not in seen_q and p not in seen_p:
            seen_q.add(q)
            seen_p.add(p)
            rows.append((q, p))
    return pd.DataFrame(rows, columns=list(COLUMNS["retrieval"]))


# --------------------------------------------------------------------------- Bibles (SWORD)

# One call per module over the whole canon: one call per book costs twice as long (each call
# opens the module again: 11.6 s vs 5.9 s for the KJV), and the cleaning below is structural.
_CANON = "Genesis 1:1-Revelation 22:21"
# diatheke prints "<book> <chapter>:<verse>: <text>", one verse a line; a psalm title it has
# seen (a <title> element) is printed again in front of every later verse, so a reference may
# follow markup on its line.
_VERSE = re.compile(r"^(?:.*?>)?\s*(?P<book>[^<>]+?) (?P<chapter>\d+):(?P<verse>\d+): (?P<text>.*)$")
_TITLE = re.compile(r"<title\b.*?</title>")
# Whatever follows a book's start or end marker is not verse text (the WEB module hangs its
# glossary on Revelation 22:21).
_BOOK_MARK = re.compile(r"<div\b[^>]*\btype=\"book\"")
# Line and paragraph markup separates words; any other element sits inside or around words.
_BREAK = re.compile(r"<(?:l|lb|lg|div|p|milestone|item|list)\b[^>]*>")
_TAG = re.compile(r"<[^>]+>")
# Where one word element ends and the next begins with nothing between them the modules lost a
# space (WEB "God</w><w>created", RV1909 "Porque</w><transChange>pasados")...
_GLUED = re.compile(r"(?<=</w>|</q>)(?=<(?:w|q|transChange)\b)|(?<=</transChange>)(?=<(?:w|q)\b)|(?<=\w)(?=<w\b)")
# ...except before an object pronoun that RV1909 marks as added to its verb ("sáca</w><transChange>lo").
_ENCLITIC = re.compile(r"<transChange[^>]*>(?:lo|la|le|los|las|les|me|te|se|nos|os)</transChange>")
_SPACE_BEFORE_MARK = re.compile(r"\s+(?=[,.;:!?])")
_MAX_LENGTH_RATIO = 2.0

Verses = dict[tuple[str, int, int], str]


def _require_sword(name: str, modules: tuple[str, ...]) -> None:
    if shutil.which(DIATHEKE) is None:
        raise _missing(name, "the diatheke program")
    for module in modules:
        if not (SWORD_DIR / "mods.d" / f"{module}.conf").is_file():
            raise _missing(name, f"the SWORD module {module} (Debian {_SWORD_PACKAGES[module]})")


def clean_osis(raw: str) -> str:
    """Plain text of one verse in the SWORD modules' OSIS markup."""
    raw = _BOOK_MARK.split(raw, maxsplit=1)[0]
    raw = _TITLE.sub(" ", raw)
    raw = _GLUED.sub(lambda m: "" if _ENCLITIC.match(raw, m.end()) else " ", raw)
    raw = _TAG.sub("", _BREAK.sub(" ", raw))
    # The KJV marks paragraphs with a pilcrow and one added word with brackets.
    raw = raw.replace("¶", " ").replace("[", "").replace("]", "")
    return _SPACE_BEFORE_MARK.sub("", " ".join(raw.split()))


def sword_verses(module: str) -> Verses:
    """Every verse of the 66-book canon in a SWORD module, keyed by (book, chapter, verse)."""
    run = subprocess.run([DIATHEKE, "-b", module, "-f", "internal", "-k", _CANON],
                         capture_output=True, text=True, encoding="utf-8", check=False)
    if run.returncode != 0:
        why = (run.stderr.strip().splitlines() or ["no message"])[-1]
        raise DataError(f"{DIATHEKE} -b {module} failed (exit {run.returncode}): {why}")
    out = run.stdout
    verses: Verses = {}
    for line in out.splitlines():
        m = _VERSE.match(line)
        if m:
            verses[(m["book"], int(m["chapter"]), int(m["verse"]))] = clean_osis(m["text"])
    if not verses:
        raise DataError(f"{DIATHEKE} -b {module} printed no verses; is the module readable? "
                        f"(reinstall {_SWORD_PACKAGES[module]})")
    return verses


def _two_bibles(first: str, second: str) -> tuple[Verses, Verses]:
    # Two diatheke processes side by side: extraction is their CPU time, not Python's.
    with ThreadPoolExecutor(max_workers=2) as pool:
        a, b = pool.map(sword_verses, (first, second))
    return a, b


def _lengths_agree(a: str, b: str) -> bool:
    # A translation of one verse is never twice as long as another; where it is, one module
    # carries extra text there (WEB puts the Romans 16:25-27 doxology after 14:23, RV1909 adds
    # colophons and folds verses it numbers differently into one).
    return bool(a) and bool(b) and 1 / _MAX_LENGTH_RATIO <= len(a) / len(b) <= _MAX_LENGTH_RATIO


def _bible_paraphrase() -> pd.DataFrame:
    _require_sword("bible-paraphrase", (KJV, WEB))
    kjv, web = _two_bibles(KJV, WEB)
    pairs = [(text, web.get(ref, "")) for ref, text in kjv.items()]
    return _unique_pairs([(q, p) for q, p in pairs if _lengths_agree(q, p)])


# RV1909 prints a chapter's (and a stanza's) first words in capitals ("EN el principio", "A
# JEHOVÁ llamé"), and keeps inside the verse what the KJV module marks as headings: a psalm's
# title before its first verse, the Hebrew letter before each stanza of Psalm 119.
_DROP_CAP = re.compile(r"[¿¡]?(?:[A-ZÁÉÍÓÚÑ] )?[A-ZÁÉÍÓÚÑ]{2,}\b")
_TITLE_END = re.compile(r"(?<=[.:;?!]\s)(?=" + _DROP_CAP.pattern + ")")
_STANZA_LETTER = re.compile(r"^[A-Z]{2,7}\.?\s+")
_CAPS_WORD = re.compile(r"(^|[.;:!?¿¡]\s*|\s)([A-ZÁÉÍÓÚÑÜ]{2,})\b")


def _uncap(text: str, forms: Counter) -> str:
    """Capitals back to the case the word has in running text: a name ("Jehová") is written
    capitalised elsewhere in the Bible, a common word ("aconteció") is not."""
    def fix(m: re.Match) -> str:
        title, lower = m[2].capitalize(), m[2].lower()
        starts_sentence = m.start() == 0 or m[1].strip() != ""
        return m[1] + (title if starts_sentence or forms[title] > forms[lower] else lower)
    return _CAPS_WORD.sub(fix, text)


def _rv1909_text(book: str, chapter: int, verse: int, text: str, forms: Counter) -> str:
    stanza = book == "Psalms" and chapter == 119 and verse % 8 == 1
    if stanza:
        text = _STANZA_LETTER.sub("", text)
    elif book == "Psalms" and verse == 1 and not _DROP_CAP.match(text):
        text = _TITLE_END.split(text, maxsplit=1)[-1]
    return _uncap(text, forms) if verse == 1 or stanza else text


def _shifted_chapters(verses: Verses) -> set[tuple[str, int]]:
    """Chapters where RV1909 numbers verses unlike the KJV: it leaves the verse it numbers
    elsewhere empty, in the chapter itself or at the end of the one before (its Numbers 13:1 is
    the KJV's 12:16)."""
    return {(b, c + d) for (b, c, _), text in verses.items() if not text for d in (0, 1)}


def _bible_es_en() -> pd.DataFrame:
    _require_sword("bible-es-en", (KJV, RV1909))
    # The KJV rather than the WEB: both modules use the KJV verse numbering, the WEB does not.
    kjv, spanish = _two_bibles(KJV, RV1909)
    skip = _shifted_chapters(spanish)
    forms = Counter(re.findall(r"\w+", " ".join(spanish.values())))
    pairs = []
    for (book, chapter, verse), text in kjv.items():
        es = _rv1909_text(book, chapter, verse, spanish.get((book, chapter, verse), ""), forms)
        if (book, chapter) not in skip and _lengths_agree(text, es):
            pairs.append((text, es))
    return _unique_pairs(pairs)


# --------------------------------------------------------------------------- chatterbot-corpus

_MIN_TOPIC_TEXTS = 20


def _chatterbot_conversations(name: str) -> list[tuple[str, list[str]]]:
    """(topic, utterances) of every English conversation, files in name order."""
    folder = CHATTERBOT_DATA
    if folder is None or not folder.is_dir():
        raise _missing(name, "the PyPI package chatterbot-corpus")
    conversations = []
    for path in sorted(folder.glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conversation in doc.get("conversations") or []:
            # YAML reads an unquoted reply such as 1963 as a number; spacing carries no meaning
            # for an embedding (code answers lose their layout).
            texts = [" ".join(str(u).split()) for u in conversation if u is not None]
            conversations.append((path.stem, [t for t in texts if t]))
    return conversations


def _chatterbot_qa() -> pd.DataFrame:
    conversations = _chatterbot_conversations("chatterbot-qa")
    return _unique_pairs([(texts[0], texts[1]) for _, texts in conversations if len(texts) >= 2])


def _chatterbot_topics() -> pd.DataFrame:
    labelled = [(text, topic) for topic, texts in _chatterbot_conversations("chatterbot-topics") for text in texts]
    labels_of: dict[str, set[str]] = {}
    for text, topic in labelled:
        labels_of.setdefault(text, set()).add(topic)
    # A text said under two topics ("Hello", "Yes") has no single right cluster.
    rows = list(dict.fromkeys((t, topic) for t, topic in labelled if len(labels_of[t]) == 1))
    counts = Counter(topic for _, topic in rows)
    rows = [(t, topic) for t, topic in rows if counts[topic] >= _MIN_TOPIC_TEXTS]
    return pd.DataFrame(rows, columns=list(COLUMNS["clustering"]))


# --------------------------------------------------------------------------- Lee et al. (gensim)


def _lee_similarity() -> pd.DataFrame:
    folder = GENSIM_TEST_DATA
    if folder is None or not (folder / "lee.cor").is_file():
        raise _missing("lee-similarity", "the PyPI package gensim (its test_data folder)")
    docs = [d.strip() for d in (folder / "lee.cor").read_text(encoding="latin-1").splitlines() if d.strip()]
    grades = np.loadtxt(folder / "similarities0-1.txt")
    if grades.shape != (len(docs), len(docs)):
        raise DataError(f"{folder}: {len(docs)} documents but a {grades.shape} grade matrix")
    # The grades fill the upper triangle (the mean of the raters, scaled to 0-1).
    rows = [(docs[i], docs[j], float(grades[i, j])) for i in range(len(docs)) for j in range(i + 1, len(docs))]
    return pd.DataFrame(rows, columns=list(COLUMNS["similarity"]))


# --------------------------------------------------------------------------- gettext catalogues

# printf and brace placeholders, markup, and keyboard accelerators are program text, not language.
_PROGRAM_TEXT = re.compile(r"%|\{|\}|<[a-zA-Z/]|\t|\\|`|--|\$")
_ACCELERATOR = re.compile(r"(?<!\w)[_&](?=\w)")
# Fewer words than this are mostly labels ("File", "Quit") that many messages share.
_MIN_WORDS = 4
_MIN_PAIRS = 300


def _catalogue_pairs(path: Path) -> list[tuple[str, str]]:
    """(English, translation) messages of one catalogue that are sentences of a language: no
    usage screens, program text or labels, accelerators removed, spaces collapsed."""
    import gettext

    with open(path, "rb") as f:
        catalogue = gettext.GNUTranslations(f)._catalog
    pairs = []
    for english, translated in sorted((k, v) for k, v in catalogue.items() if isinstance(k, str)):
        if "\n" in english.strip() or english.lstrip().startswith("-"):
            continue  # usage screens: option lists that match on their option names alone
        english, translated = (" ".join(_ACCELERATOR.sub("", x).split()) for x in (english, translated))
        if (len(english.split()) < _MIN_WORDS or not translated or translated == english
                or _PROGRAM_TEXT.search(english) or _PROGRAM_TEXT.search(translated)):
            continue
        pairs.append((english, translated))
    return pairs


def _gettext_pairs(lang: str) -> pd.DataFrame:
    name = f"gettext-{lang}"
    pairs = []
    for domain in GETTEXT_DOMAINS:
        path = LOCALE_DIR / lang / "LC_MESSAGES" / f"{domain}.mo"
        if path.is_file():
            pairs += _catalogue_pairs(path)
    frame = _unique_pairs(pairs)
    if len(frame) < _MIN_PAIRS:
        raise _missing(name, f"the {GETTEXT_LANGUAGES[lang]} message catalogues ({len(frame)} usable messages found "
                             f"under {LOCALE_DIR / lang / 'LC_MESSAGES'})")
    return frame


def training_messages(languages: list[str]) -> list[tuple[str, str]]:
    """(English, translation) pairs to distil on from the message catalogues the gettext-<lang>
    sets do not read (GTK, GLib, PackageKit, PostgreSQL... whatever is installed), in
    ``languages``. A message whose English or translation is also in an evaluation catalogue (of
    any language) is left out, so the evaluation sets stay unseen. A catalogue that cannot be
    read (a wrong charset header) is skipped."""
    held_out: set[str] = set()
    for lang in GETTEXT_LANGUAGES:
        for domain in GETTEXT_DOMAINS:
            path = LOCALE_DIR / lang / "LC_MESSAGES" / f"{domain}.mo"
            if path.is_file():
                held_out.update(x.lower() for pair in _catalogue_pairs(path) for x in pair)
    kept = []
    for lang in languages:
        folder = LOCALE_DIR / lang / "LC_MESSAGES"
        for path in sorted(folder.glob("*.mo")):
            # iso_*: names of countries, languages and scripts, labels rather than sentences.
            if path.stem in GETTEXT_DOMAINS or path.stem.startswith("iso_"):
                continue
            try:
                pairs = _catalogue_pairs(path)
            except (UnicodeDecodeError, OSError, LookupError):
                continue
            kept += [pair for pair in pairs if not {y.lower() for y in pair} & held_out]
    return kept


_EXTRACTORS: dict[str, Callable[[], pd.DataFrame]] = {
    **{f"gettext-{lang}": (lambda lang=lang: _gettext_pairs(lang)) for lang in GETTEXT_LANGUAGES},
    "bible-paraphrase": _bible_paraphrase,
    "bible-es-en": _bible_es_en,
    "chatterbot-qa": _chatterbot_qa,
    "chatterbot-topics": _chatterbot_topics,
    "lee-similarity": _lee_similarity,
}
