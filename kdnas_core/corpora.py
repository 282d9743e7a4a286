"""General English corpora that install offline from Debian packages, for distilling students
that keep what they inherited outside one domain.

- ``wordnet`` (``apt-get install wordnet-base``; WordNet 3.0 licence, BSD-like): every synset's
  definition and each of its quoted usage examples as separate texts, about 160,000 texts.
- ``gcide`` (``apt-get install dict-gcide``; GNU GPL 3 or later): the numbered senses and plain
  definitions of the GNU Collaborative International Dictionary of English, about 100,000 texts.
  Quotations (the lines cited "--Shak.", "--Bible" ...) are left out: they are literature, some of
  it the Bible that the evaluation retrieves from, not definitions.

Neither holds Bible verses, chatbot lines or tweets, the sources the default evaluation reads, and
the workspace scores every task only on texts the students were not distilled on anyway.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

from kdnas_core.errors import DataError

WORDNET_ROOT = Path("/usr/share/wordnet")
GCIDE_FILE = Path("/usr/share/dictd/gcide.dict.dz")
INSTALL = {"wordnet": "apt-get install wordnet-base", "gcide": "apt-get install dict-gcide"}

_EXAMPLE = re.compile(r'"([^"]{8,})"')
# GCIDE ends each definition or quotation with its source in brackets: [1913 Webster], [PJC] ...
_GCIDE_SOURCE = re.compile(r"\[[^\]\n]*?(?:Webster|PJC|WordNet|Century|Chambers|RJC|JC|MW|Mw|DHP|CIA)[^\]\n]*?\]")
_QUOTATION = re.compile(r"--\s*[A-Z][\w.' ]*\.?\s*$")  # "... --Macaulay."
_HEADWORD = re.compile(r"^[\w' -]+ \\")  # "Abuse \A*buse"\, n. [F. abus ...]"
_PRONUNCIATION = re.compile(r"\\|\[\^\]|\*\w|`")  # markup of a headword's pronunciation


def _missing(source: str, where: Path) -> DataError:
    return DataError(f"data.source {source!r}: {where} not found ({INSTALL[source]}, or bash infra/install-data.sh)")


def wordnet_texts(root: Path = WORDNET_ROOT) -> list[str]:
    """Definitions and usage examples of WordNet's nouns, verbs, adjectives and adverbs."""
    files = [root / f"data.{pos}" for pos in ("noun", "verb", "adj", "adv")]
    if not all(f.is_file() for f in files):
        raise _missing("wordnet", root)
    out: list[str] = []
    for f in files:
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  ") or " | " not in line:  # the licence header, or no gloss
                continue
            gloss = line.split(" | ", 1)[1].strip()
            definition = gloss.split('; "', 1)[0].split(' "', 1)[0].strip(" ;")
            out.append(definition)
            out.extend(m.strip() for m in _EXAMPLE.findall(gloss))
    return out


def _gcide_definition(block: str) -> str | None:
    """The definition that ends ``block`` (the text before one source marker), or None when it is
    a quotation, a bare headword or pronunciation markup."""
    paragraphs = [p for p in re.split(r"\n\s*\n", block) if p.strip()]
    if not paragraphs:
        return None
    text = " ".join(paragraphs[-1].split())
    if _QUOTATION.search(text):
        return None
    if _HEADWORD.match(text):  # an entry's first line: keep what follows its etymology
        m = re.search(r"\]\s*(.*)$", text)
        text = m.group(1) if m else ""
    text = re.sub(r"^(?:\d+\.\s*)?(?:\([a-z]\)\s*)?(?:\([^)]*\)\s*)?", "", text)
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # a leading etymology
    text = text.replace("{", "").replace("}", "")
    for label in ("Syn:", "Note:", "Usage:"):
        text = text.removeprefix(label).strip()
    if len(text) < 20 or _PRONUNCIATION.search(text):
        return None
    return text


def gcide_texts(path: Path = GCIDE_FILE) -> list[str]:
    """The definitions of the GNU Collaborative International Dictionary of English."""
    if not path.is_file():
        raise _missing("gcide", path)
    raw = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
    return [t for block in _GCIDE_SOURCE.split(raw) if (t := _gcide_definition(block)) is not None]
