"""Comments cite only what a reader can open, and what they cite exists.

A reason in a comment is only as good as the reader's way to check it. The
forms this repository uses (docs/faults.md, "How to read and cite this file"):

- ``(docs/faults.md, "Heading")`` and ``(docs/decisions.md, "Heading")``: a
  level-1 to level-6 heading of that file, word for word;
- ``(README, "Section")``, also written ``README "Section"`` or
  ``README's "Section"``: a heading of the top-level README.md;
- RFC sections (``RFC 9110 §7.8``), CVEs and public issues (``golang/go#50580``).

Refused: a document that is not in the repository (a ``reliability.md``, with
its section letters such as ``C.37`` or ``§0.9`` and its "Decision N"), and a
bare "issue N" that names no tracker. The docs' own ``path::name`` references
to code and tests must name something that exists, so the catalogue does not
rot when code moves.
"""

from __future__ import annotations

import ast
import difflib
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
THIS = Path(__file__).resolve()
SCANNED_DIRS = ("proxy", "tests", "bench", "docs")
SUFFIXES = frozenset({".py", ".md", ".mjs", ".js", ".java", ".html", ".sh", ".yaml", ".txt"})
SKIPPED_DIRS = frozenset({"node_modules", "__pycache__", ".venv", "target", "build"})
DOCS = {
    "docs/faults.md": ROOT / "docs" / "faults.md",
    "docs/decisions.md": ROOT / "docs" / "decisions.md",
}

# What no comment may cite, each with the reason shown when it does.
UNOPENABLE: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"reliability\.md", re.IGNORECASE),
        "a document outside the repository: cite a docs/faults.md heading instead",
    ),
    (
        re.compile(r"\bissues?\s*#?\d+", re.IGNORECASE),
        "an issue number with no tracker: cite docs/decisions.md, a README section, "
        "or a public issue as owner/repo#N",
    ),
    (
        # The catalogue's section letters (A.9, C.37, D.39-D.42) and its §0.N list.
        re.compile(r"(?<![\w.§])[A-H]\.\d{1,3}(?![\w.])|§0\.\d+"),
        "a section of a document outside the repository: cite a docs/faults.md heading",
    ),
    (
        re.compile(r"\bDecision\s+\d+\b"),
        "a numbered decision of a document outside the repository: cite docs/decisions.md",
    ),
)

# ``(docs/faults.md, "A")``, ``(docs/decisions.md, "A", "B")``; the separators may
# run over a line break and a comment's ``#``.
_SEP = r"[\s#]*"
_TITLES = rf'"[^"]+"(?:{_SEP}(?:,|and|;){_SEP}"[^"]+")*'
DOC_CITATION = re.compile(rf"\((docs/(?:faults|decisions)\.md){_SEP},{_SEP}({_TITLES})\)")
README_CITATION = re.compile(rf"(?<![\w/.])README(?:'s)?{_SEP},?{_SEP}({_TITLES})")
TITLE = re.compile(r'"([^"]+)"')
# Code and test references in the docs: `proxy/inbound/upload.py::PartWatcher`.
CODE_REFERENCE = re.compile(r"`((?:proxy|tests|bench)/[\w/]+\.py)::([\w.]+)`")
# Links between the docs and to the README: [text](../README.md#anchor), [text](#anchor).
LINK = re.compile(r"\]\((?:((?:\.\./)?[\w/]*\.md)|(?=#))(?:#([\w-]+))?\)")


def scanned_files() -> list[Path]:
    found = []
    for top in SCANNED_DIRS:
        for path in sorted((ROOT / top).rglob("*")):
            parts = set(path.relative_to(ROOT).parts)
            if path.suffix in SUFFIXES and path.is_file() and not parts & SKIPPED_DIRS:
                if path.resolve() != THIS:
                    found.append(path)
    return found


def name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def unopenable(text: str) -> Iterator[tuple[int, str, str]]:
    """(line number, the offending words, why) for each citation a reader cannot open."""
    for number, line in enumerate(text.splitlines(), 1):
        for pattern, why in UNOPENABLE:
            for match in pattern.finditer(line):
                yield number, match.group(0), why


def normalised(title: str) -> str:
    """A title as cited, with a line break (and a comment's ``#``) read as one space."""
    return re.sub(r"\s*\n[\s#]*", " ", title).strip()


def citations(text: str) -> Iterator[tuple[int, str, str]]:
    """(line number, cited document, title) for every citation of a docs file or the README."""
    for pattern, document in ((DOC_CITATION, None), (README_CITATION, "README.md")):
        for match in pattern.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            cited = document or match.group(1)
            for title in TITLE.findall(match.group(match.lastindex or 1)):
                yield line, cited, normalised(title)


def headings_of(markdown: str) -> list[str]:
    """The text of every heading, outside fenced code blocks."""
    titles, fenced = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (heading := re.match(r"#{1,6}\s+(.+?)\s*#*\s*$", line)):
            titles.append(heading.group(1))
    return titles


@cache
def headings(document: str) -> frozenset[str]:
    return frozenset(headings_of((ROOT / document).read_text(encoding="utf-8")))


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


@pytest.mark.parametrize("path", scanned_files(), ids=name)
def test_cites_only_what_a_reader_can_open(path: Path) -> None:
    problems = [
        f"{name(path)}:{line}: {words!r}: {why}" for line, words, why in unopenable(read(path))
    ]
    assert not problems, "\n".join(problems)


def test_every_cited_section_exists() -> None:
    problems = []
    for path in scanned_files():
        for line, document, title in citations(read(path)):
            known = headings(document)
            if title not in known:
                near = difflib.get_close_matches(title, known, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                problems.append(f"{name(path)}:{line}: {document} has no heading {title!r}{hint}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("document", sorted(DOCS))
def test_headings_are_unique_anchors(document: str) -> None:
    titles = headings_of(DOCS[document].read_text(encoding="utf-8"))
    assert len(titles) == len(set(titles)), sorted(t for t in titles if titles.count(t) > 1)


def anchor(title: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces
    made hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("document", sorted(DOCS))
def test_links_point_at_files_and_headings_that_exist(document: str) -> None:
    problems = []
    for target, fragment in LINK.findall(DOCS[document].read_text(encoding="utf-8")):
        path = (DOCS[document].parent / target).resolve() if target else DOCS[document]
        if not path.is_file():
            problems.append(f"{document}: {target} does not exist")
        elif fragment and fragment not in {anchor(t) for t in headings(name(path))}:
            where = target or "itself"
            problems.append(f"{document}: {where} has no heading with the anchor #{fragment}")
    assert not problems, "\n".join(problems)


@cache
def definitions(path: Path) -> dict[str, ast.AST]:
    """Top-level names of a module (functions, classes, assignments), and
    ``Class.member`` for what a class defines."""
    found: dict[str, ast.AST] = {}

    def collect(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                found[prefix + node.name] = node
                if isinstance(node, ast.ClassDef):
                    collect(node.body, f"{prefix}{node.name}.")
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Name):
                        found[prefix + target.id] = node

    collect(ast.parse(read(path)).body, "")
    return found


@pytest.mark.parametrize("document", sorted(DOCS))
def test_docs_point_at_code_and_tests_that_exist(document: str) -> None:
    text = DOCS[document].read_text(encoding="utf-8")
    references = CODE_REFERENCE.findall(text)
    assert references, f"{document} names no code or test"
    problems = []
    for file, symbol in references:
        path = ROOT / file
        if not path.is_file():
            problems.append(f"{document}: {file} does not exist (for {symbol})")
        elif symbol not in definitions(path):
            problems.append(f"{document}: {file} defines no {symbol}")
    assert not problems, "\n".join(problems)


# The checks themselves must be able to fail.


@pytest.mark.parametrize(
    "line",
    [
        "# bytes after it must not be read as another request (reliability.md C.36).",
        "the parser-differential lesson of reliability.md §0.9",
        "(they can hold a key: see C.37)",
        "Every assertion is on what the upstream received (D.39-D.42, A.12).",
        "# Slow clients (issue 5): time allowed to send the request headers",
        "memory per open stream is an issue 8 goal",
        "(issue 9.2)",
        "it bounds that itself (Decision 6)",
        "see Issue #12",
    ],
)
def test_unopenable_citations_are_found(line: str) -> None:
    assert list(unopenable(line))


@pytest.mark.parametrize(
    "line",
    [
        "served over HTTP/1.1, as RFC 9110 §7.8 lets a server do",
        "(RFC 6455 §7.4.1, §7.4.2; 1012-1014 are in the IANA registry, §11.7)",
        "stripping can never remove the proxy's credential (golang/go#50580)",
        "with pytest.raises(Exception):  # noqa: B017 - aborted",
        "Autobahn's cases 9.1.1-9.1.3 and 7.7.x",
        "ITU-T I.371, the generic cell rate algorithm",
        "x = headers.B.1",
        '(docs/faults.md, "Malformed upstream answers")',
    ],
)
def test_openable_citations_pass(line: str) -> None:
    assert not list(unopenable(line))


def test_citations_are_parsed_across_comment_lines() -> None:
    text = (
        '# A stream can run for minutes (docs/decisions.md, "A stream holds neither\n'
        '# the request body nor the retry state"); see (README, "Timeouts") and\n'
        '"""README\'s "Stop, reload, workers" and (docs/faults.md, "Slow headers\n'
        '    (slowloris)", "Idle connections")."""\n'
        'path = DEPLOY / "README.md"  # not a citation\n'
    )
    assert list(citations(text)) == [
        (1, "docs/decisions.md", "A stream holds neither the request body nor the retry state"),
        (3, "docs/faults.md", "Slow headers (slowloris)"),
        (3, "docs/faults.md", "Idle connections"),
        (2, "README.md", "Timeouts"),
        (3, "README.md", "Stop, reload, workers"),
    ]


def test_anchors_are_made_as_github_makes_them() -> None:
    assert anchor("Model discovery (`models: discover`)") == "model-discovery-models-discover"
    assert anchor("Stop, reload, workers") == "stop-reload-workers"
    assert anchor("Slow headers (slowloris)") == "slow-headers-slowloris"


def test_headings_in_code_blocks_are_not_headings() -> None:
    markdown = "# Title\n\n```yaml\n# a comment\n```\n\n### Entry\n"
    assert headings_of(markdown) == ["Title", "Entry"]
