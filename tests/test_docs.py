"""The user docs (README.md and docs/**/*.md) quote only what exists.

- every ``kdnas <subcommand> --flag`` in code is a sub-command of the CLI parser with that flag;
- every ``--set KEY=VALUE`` names a config field;
- every ``make <target>`` in code is a target of the Makefile;
- every config key quoted in backticks (``distill.lr``, ``search_space.cap_activation``: a dotted
  name whose first part is a top-level section of ``KDNASConfig``) is a field of the config;
- every relative link points to a file that exists (and, for a ``#anchor``, to a heading);
- user docs name no issue numbers or commit hashes, except on a provenance line and in the dated
  notes under docs/experiments/.

Fast: it reads text and walks the argparse and pydantic objects; no model is loaded.
"""

from __future__ import annotations

import argparse
import re
import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from kdnas.cli import build_parser
from kdnas_core.config import KDNASConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
USER_DOCS = [p for p in DOCS if "experiments" not in p.relative_to(ROOT).parts]

FENCE = re.compile(r"^([ \t]*)(```|~~~)[^\n]*\n(.*?)^\1\2[ \t]*$", re.M | re.S)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def split_code(text: str) -> tuple[list[str], list[str], str]:
    """(fenced block bodies, inline code spans, prose with the fenced blocks removed)."""
    blocks = [m.group(3) for m in FENCE.finditer(text)]
    prose = FENCE.sub("", text)
    return blocks, INLINE.findall(prose), prose


def command_lines(text: str) -> list[str]:
    """Code lines that may hold a command: every fenced line (continuations joined) and every
    inline span."""
    blocks, spans, _ = split_code(text)
    lines = []
    for body in blocks:
        lines += re.sub(r"\\\n\s*", " ", body).splitlines()
    return lines + spans


# --------------------------------------------------------------------------- the CLI


def cli_flags() -> dict[str, set[str]]:
    parser = build_parser()
    top = {s for a in parser._actions for s in a.option_strings}
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: top | {s for a in p._actions for s in a.option_strings} for name, p in subs.choices.items()}


KDNAS_CALL = re.compile(r"(?:^|[\s`(|;&$])(?:[\w.~/-]*/)?kdnas((?:[ \t]+--debug)?)[ \t]+([a-z][\w-]*)(.*)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][\w-]*)")
SET = re.compile(r"--set[ \t=]+['\"]?([a-z_]\w*(?:\.[\w\[\]]+)+)=")


def _cut(rest: str) -> str:
    """A command's arguments: up to a comment, a pipe, a command separator or a redirect."""
    return re.split(r"\s#|\||;|&&|\s>", rest, maxsplit=1)[0]


def kdnas_calls(text: str) -> list[tuple[str, str]]:
    out = []
    for line in command_lines(text):
        for m in KDNAS_CALL.finditer(line.split(" # ")[0] if not line.lstrip().startswith("#") else ""):
            out.append((m.group(2), _cut(m.group(3))))
    return out


def test_cli_subcommands_and_flags_exist():
    flags = cli_flags()
    problems, seen = [], 0
    for doc in DOCS:
        for sub, args in kdnas_calls(doc.read_text(encoding="utf-8")):
            seen += 1
            if sub not in flags:
                problems.append(f"{_rel(doc)}: `kdnas {sub}`: no such sub-command (have {sorted(flags)})")
                continue
            for flag in FLAG.findall(args):
                if flag not in flags[sub]:
                    problems.append(f"{_rel(doc)}: `kdnas {sub} {flag}`: no such option")
    assert seen > 10, "the docs quote fewer kdnas commands than expected: is the parser of this test broken?"
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- config keys


def _unwrap(annotation):
    """The model or leaf type behind Optional[...] and list[...]; dict types are returned as is."""
    while True:
        origin = typing.get_origin(annotation)
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            annotation = models[0] if models else args[0]
        elif origin in (list, tuple):
            annotation = typing.get_args(annotation)[0]
        else:
            return annotation


def resolve_key(dotted: str) -> str | None:
    """None when ``dotted`` (``distill.weights.pooled_cosine``, ``evaluate.tasks[1].path``) is a
    field of KDNASConfig, else why not."""
    parts = re.sub(r"\[\d+\]", "", dotted).split(".")
    node = KDNASConfig
    for i, part in enumerate(parts):
        if not (isinstance(node, type) and issubclass(node, BaseModel)):
            origin = typing.get_origin(node)
            if origin is dict or node is dict or node is typing.Any:
                return None  # a dict-valued field: its keys are the user's
            return f"{'.'.join(parts[:i])} is a value, not a section"
        if part not in node.model_fields:
            return f"{'.'.join(parts[:i]) or 'the config'} has no field {part!r} (has {', '.join(node.model_fields)})"
        node = _unwrap(node.model_fields[part].annotation)
    return None


SECTIONS = [n for n, f in KDNASConfig.model_fields.items() if isinstance(f.default, BaseModel)]
KEY = re.compile(r"(?<![\w./\]-])((?:%s)(?:\.[A-Za-z_]\w*(?:\[\d+\])?)+)(?![\w/(.-])" % "|".join(SECTIONS))


def quoted_keys(text: str) -> list[str]:
    _, spans, _ = split_code(text)
    keys = []
    for span in spans:
        keys += [k for k in KEY.findall(span) if not re.search(r"\.(py|md|csv|json|jsonl|yaml|png|txt|npy)$", k)]
    for line in command_lines(text):
        keys += SET.findall(line)
    return keys


def test_quoted_config_keys_exist():
    problems, seen = [], 0
    for doc in DOCS:
        for key in quoted_keys(doc.read_text(encoding="utf-8")):
            seen += 1
            if (why := resolve_key(key)) is not None:
                problems.append(f"{_rel(doc)}: `{key}`: {why}")
    assert seen > 50, "the docs quote fewer config keys than expected: is the parser of this test broken?"
    assert not problems, "\n".join(problems)


def test_key_resolution():
    assert resolve_key("distill.weights.pooled_cosine") is None
    assert resolve_key("evaluate.tasks[1].label_column") is None
    assert resolve_key("runner.resources.GPU") is None  # dict-valued
    assert resolve_key("distill.learning_rate") is not None
    assert resolve_key("distill.lr.x") is not None
    assert KEY.findall("see `search_space.cap_activation`, not kdnas_core/search/loop.py") == ["search_space.cap_activation"]


# --------------------------------------------------------------------------- make targets


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {m.group(1) for m in re.finditer(r"^([A-Za-z][\w-]*)\s*:(?!=)", text, re.M)}


def test_make_targets_exist():
    targets = make_targets()
    assert {"demo", "test", "test-reliability"} <= targets
    problems, seen = [], 0
    for doc in DOCS:
        for line in command_lines(doc.read_text(encoding="utf-8")):
            for target in re.findall(r"(?:^|[\s`(;&])make[ \t]+([a-z][\w-]*)", line):
                seen += 1
                if target not in targets:
                    problems.append(f"{_rel(doc)}: `make {target}`: no such target (have {sorted(targets)})")
    assert seen >= 3
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- links


LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def anchors(path: Path) -> set[str]:
    _, _, prose = split_code(path.read_text(encoding="utf-8"))
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", prose, re.M)}


def test_relative_links_resolve():
    problems, seen = [], 0
    for doc in DOCS:
        _, _, prose = split_code(doc.read_text(encoding="utf-8"))
        prose = INLINE.sub("", prose)
        for m in LINK.finditer(prose):
            target = m.group(1) or m.group(2)
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            seen += 1
            file, _, anchor = target.partition("#")
            dest = (doc.parent / file).resolve() if file else doc
            if not dest.exists():
                problems.append(f"{_rel(doc)}: link to {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{_rel(doc)}: link to {target}: no heading with that anchor")
    assert seen > 20
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- what a reader cannot use


HASH = re.compile(r"(?<![\w/.-])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}(?![\w/-])")
ISSUE = re.compile(r"(?i)\bissue[ -]?#?\d+|(?<![\w&/])#\d+\b")


@pytest.mark.parametrize("doc", USER_DOCS, ids=_rel)
def test_no_issue_numbers_or_commit_hashes(doc):
    problems = []
    for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
        if "provenance" in line.lower():
            continue
        for m in [*HASH.finditer(line), *ISSUE.finditer(line)]:
            problems.append(f"{_rel(doc)}:{n}: {m.group(0)!r}")
    assert not problems, "user docs name issue numbers or commits a reader cannot use:\n" + "\n".join(problems)


def test_readme_is_short_and_keeps_its_set_up():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    for must in ("make demo", "make test", "make test-reliability", "pip install torch==2.13.0", "pip install -e ."):
        assert must in text, must
