"""Documentation consistency: § references resolve to docs/method.md, relative links point to files,
and nothing outside the tests depends on files outside the repository.

The code cites the method reference as ``docs/method.md §N.M`` or ``§N.M``: ``§N`` must be a heading
``## N.`` of docs/method.md and ``§N.M`` a heading ``### N.M`` ("§7 items 21-24" needs 7.21 … 7.24).
All checks are text scans (no model runs); the last test feeds each checker a planted error to show
that it can fail.
"""
from __future__ import annotations

import bisect
import re
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"

SECTION = chr(0xA7)   # the section sign, spelled out so that this file holds no reference itself
REF_RE = re.compile(
    SECTION + r"\s*(\d+(?:\.\d+)?)"                                  # §N or §N.M
    r"(?:\s*items?\s+(\d+)\s*(?:[-\u2013]\s*(\d+))?"                 # "§7 items 21-24", "§7 item 5"
    r"|\s*[-\u2013]\s*(\d+\.\d+)(?![\d.]))?")                        # "§3.1-3.2" (second part bare)
SECTION_HEADING_RE = re.compile(r"^## (\d+)\. \S")
SUBSECTION_HEADING_RE = re.compile(r"^### (\d+\.\d+) \S")
HEADING_RE = re.compile(r"^(#{1,6}) +(.*?)\s*#*\s*$")
FENCE_RE = re.compile(r"^\s*(```|~~~)")
INLINE_LINK_RE = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^()\s<>]+(?:\([^()\s]*\))?)>?(?:\s+[\"'(][^)]*)?\)")
REFERENCE_DEF_RE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
INLINE_CODE_RE = re.compile(r"(`+)(?:(?!\1).)+?\1")
SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")

REF_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh"}
REF_NAMES = {"Makefile"}
FORBIDDEN = ("../shared", "/work/")


# ------------------------------------------------------------------------------------------ helpers

def tracked_files(root: Path = ROOT) -> list[Path]:
    """Files tracked by git (that still exist in the working tree); skips the test without git."""
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"not a git work tree ({err}); the tracked-file checks need git")
    paths = [root / p for p in out.decode("utf-8", "surrogateescape").split("\0") if p]
    return [p for p in paths if p.is_file()]


def read_text(path: Path) -> str | None:
    """The file's text, or None for a binary file (NUL bytes or not UTF-8)."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def markdown_lines(text: str):
    """(line number, line) of Markdown text outside fenced code blocks."""
    fence = None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE_RE.match(line)
        if match:
            if fence is None:
                fence = match.group(1)
                continue
            if match.group(1) == fence:
                fence = None
                continue
        if fence is None:
            yield number, line


def method_headings(path: Path = METHOD) -> tuple[set[str], set[str]]:
    """(section numbers "N", subsection numbers "N.M") of the method reference."""
    sections, subsections = set(), set()
    for _, line in markdown_lines(path.read_text(encoding="utf-8")):
        if m := SECTION_HEADING_RE.match(line):
            sections.add(m.group(1))
        elif m := SUBSECTION_HEADING_RE.match(line):
            subsections.add(m.group(1))
    return sections, subsections


def references(text: str):
    """(line number, cited number, matched text) for every § reference in ``text``.

    "§7 items 21-24" yields 7, 7.21, 7.22, 7.23 and 7.24; "§3.1-3.2" yields 3.1 and 3.2.
    """
    line_starts = [0] + [i + 1 for i, ch in enumerate(text) if ch == "\n"]
    for match in REF_RE.finditer(text):
        number = bisect.bisect_right(line_starts, match.start())
        ref, first, last, bare = match.groups()
        yield number, ref, match.group(0)
        if first is not None and "." not in ref:
            for item in range(int(first), int(last or first) + 1):
                yield number, f"{ref}.{item}", match.group(0)
        if bare is not None:
            yield number, bare, match.group(0)


def unresolved_references(files: list[Path], root: Path, headings: tuple[set[str], set[str]]) -> list[str]:
    """'file:line: §ref (in "...")' for every reference without a heading."""
    sections, subsections = headings
    problems = []
    for path in files:
        text = read_text(path)
        if text is None:
            continue
        for number, ref, matched in references(text):
            known = subsections if "." in ref else sections
            if ref not in known:
                problems.append(f"{path.relative_to(root)}:{number}: {SECTION}{ref} (in {matched!r})")
    return problems


def forbidden_mentions(files: list[Path], root: Path) -> list[str]:
    problems = []
    for path in files:
        text = read_text(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for needle in FORBIDDEN:
                if needle in line:
                    problems.append(f"{path.relative_to(root)}:{number}: mentions {needle!r}: {line.strip()[:120]}")
    return problems


def link_targets(text: str):
    """(line number, target) of the inline links, images and reference definitions of Markdown text."""
    for number, line in markdown_lines(text):
        line = INLINE_CODE_RE.sub("", line)
        for match in INLINE_LINK_RE.finditer(line):
            yield number, match.group(1)
        if match := REFERENCE_DEF_RE.match(line):
            yield number, match.group(1)


def broken_links(files: list[Path], root: Path) -> list[str]:
    """'file:line: target' for every relative link whose file part does not exist."""
    problems = []
    for path in files:
        for number, target in link_targets(path.read_text(encoding="utf-8")):
            if SCHEME_RE.match(target) or target.startswith(("#", "//")):
                continue                                   # URL, mail address or same-page anchor
            file_part = unquote(re.split(r"[#?]", target, maxsplit=1)[0])
            if not file_part:
                continue
            base = root if file_part.startswith("/") else path.parent
            if not (base / file_part.lstrip("/")).exists():
                problems.append(f"{path.relative_to(root)}:{number}: {target}")
    return problems


def duplicate_headings(path: Path) -> list[str]:
    seen: dict[str, int] = {}
    problems = []
    for number, line in markdown_lines(path.read_text(encoding="utf-8")):
        if m := HEADING_RE.match(line):
            title = m.group(2)
            key = title.lower()
            if key in seen:
                problems.append(f"{path.name}:{number}: heading {title!r} repeats line {seen[key]}")
            else:
                seen[key] = number
    return problems


def reference_files(root: Path = ROOT) -> list[Path]:
    """Tracked text files that may cite the method reference (not the reference itself)."""
    return [p for p in tracked_files(root)
            if (p.suffix in REF_SUFFIXES or p.name in REF_NAMES) and p != root / "docs" / "method.md"]


def markdown_pages(root: Path = ROOT) -> list[Path]:
    """README.md and every Markdown page under docs/ (tracked or not: pages are being added)."""
    pages = [root / "README.md"] if (root / "README.md").is_file() else []
    return pages + sorted((root / "docs").rglob("*.md"))


# ------------------------------------------------------------------------------------------- tests

def test_method_reference_numbering():
    """Sections 0-9, and the thirty numbered problems of section 7 as headings 7.1 … 7.30."""
    sections, subsections = method_headings()
    assert sections == {str(n) for n in range(10)}
    assert {f"7.{n}" for n in range(1, 31)} <= subsections
    assert not {s for s in subsections if s.startswith("7.")} - {f"7.{n}" for n in range(1, 31)}


def test_method_reference_headings_unique():
    assert duplicate_headings(METHOD) == []
    numbers = [m.group(1) for _, line in markdown_lines(METHOD.read_text(encoding="utf-8"))
               if (m := SECTION_HEADING_RE.match(line) or SUBSECTION_HEADING_RE.match(line))]
    assert len(numbers) == len(set(numbers)), "a section number is used twice"


def test_section_references_resolve():
    files = reference_files()
    assert files, "no tracked files found"
    problems = unresolved_references(files, ROOT, method_headings())
    assert not problems, "references without a heading in docs/method.md:\n" + "\n".join(problems)


def test_no_paths_outside_the_repository():
    files = [p for p in tracked_files() if not p.relative_to(ROOT).parts[0] == "tests"]
    if METHOD not in files and METHOD.is_file():
        files.append(METHOD)
    problems = forbidden_mentions(files, ROOT)
    assert not problems, "files outside tests/ that point outside the repository:\n" + "\n".join(problems)


def test_relative_links_exist():
    problems = broken_links(markdown_pages(), ROOT)
    assert not problems, "relative links to missing files:\n" + "\n".join(problems)


def test_checkers_catch_planted_errors(tmp_path):
    """Each checker reports a planted error in a scratch copy (the repository is not touched)."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "method.md").write_text("# T\n\n## 1. One\n\n### 1.1 A\n\n## 7. Seven\n\n### 7.21 X\n\n"
                                    "### 7.22 Y\n\n### 1.1 A\n\n```\n## 9. in a code block\n```\n")
    headings = method_headings(docs / "method.md")
    assert headings == ({"1", "7"}, {"1.1", "7.21", "7.22"})
    assert duplicate_headings(docs / "method.md") == ["method.md:13: heading '1.1 A' repeats line 5"]

    code = tmp_path / "code.py"
    code.write_text(f"# ok: {SECTION}1.1, {SECTION}1, {SECTION}7.21-{SECTION}7.22\n"
                    f"# bad: {SECTION}9.9\n# bad item: {SECTION}7 items 21-23\n# bad range: {SECTION}1.1-1.2\n")
    problems = unresolved_references([code], tmp_path, headings)
    assert problems == [f"code.py:2: {SECTION}9.9 (in '{SECTION}9.9')",
                        f"code.py:3: {SECTION}7.23 (in '{SECTION}7 items 21-23')",
                        f"code.py:4: {SECTION}1.2 (in '{SECTION}1.1-1.2')"]

    (tmp_path / "README.md").write_text(
        "[ok](docs/method.md#1-one) ![ok](docs/method.md) [web](https://example.org/x.md) [anchor](#top)\n"
        "[missing](docs/nothing.md#x) `[not a link](nowhere.md)`\n\n```\n[in code](nowhere.md)\n```\n"
        "[ref]: docs/gone.png\n")
    assert broken_links([tmp_path / "README.md"], tmp_path) == [
        "README.md:2: docs/nothing.md#x", "README.md:7: docs/gone.png"]

    shared = tmp_path / "setup.sh"
    shared.write_text("cp ../shared/data x\nls /work/main\n")
    assert [p.split(": mentions")[0] for p in forbidden_mentions([shared], tmp_path)] == ["setup.sh:1", "setup.sh:2"]
