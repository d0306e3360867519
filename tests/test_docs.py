"""The Markdown docs (README.md and docs/*.md) stay navigable and their commands stay runnable.

Conventions checked here (fast: no network, no heavy imports; only `bash -n` is run):

- Every relative link resolves to a file or folder of the repo; a `#anchor` into a Markdown file
  names a heading there (GitHub's slug: lowercase, punctuation dropped, spaces to hyphens).
  External http(s) links are checked for syntax only, never fetched.
- Code blocks tagged ```bash, ```sh or ```shell hold commands only (comments allowed) and must
  parse with `bash -n`. Put command output or a mixed transcript in a block tagged ```console or
  ```text; blocks with any other tag (yaml, json, python, ...) or none are not checked.
  Placeholders in bash blocks must stay valid bash: `"$NAME"` or `'<name>'`, not a bare `<name>`.
- README.md is a front door: under 260 lines, and it links every page in docs/.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_LINES = 260

SHELL_TAGS = {"bash", "sh", "shell"}
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]"  # [text], one level of nested [] allowed
    r"\(\s*(<[^>]*>|[^()\s]*(?:\([^()\s]*\)[^()\s]*)*)"  # (target), balanced () inside
    r"(?:\s+\"[^\"]*\")?\s*\)"  # optional "title"
)
REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(\S+)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def scan(path: Path) -> tuple[list[tuple[int, str]], list[tuple[int, str, str]]]:
    """Prose lines (1-based number, text) outside fences, and code blocks (line, tag, body)."""
    prose: list[tuple[int, str]] = []
    blocks: list[tuple[int, str, str]] = []
    fence = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        match = FENCE.match(line)
        if fence is None:
            if match:
                fence, tag, start, body = match.group(1), match.group(2).lower(), number, []
            else:
                prose.append((number, line))
        elif (
            match
            and match.group(1)[0] == fence[0]
            and len(match.group(1)) >= len(fence)
            and not match.group(2)
        ):
            blocks.append((start, tag, "\n".join(body) + "\n"))
            fence = None
        else:
            body.append(line)
    assert fence is None, f"{rel(path)}:{start}: code block never closed"
    return prose, blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: links and emphasis reduced to text, then slugified."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for _, line in scan(path)[0]:
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def links(path: Path) -> list[tuple[int, str]]:
    found = []
    for number, line in scan(path)[0]:
        line = INLINE_CODE.sub("", line)
        for match in LINK.finditer(line):
            found.append((number, match.group(1).strip("<>")))
        ref = REF_DEF.match(line)
        if ref:
            found.append((number, ref.group(1).strip("<>")))
    return found


def link_cases():
    return [
        pytest.param(page, number, target, id=f"{rel(page)}:{number}:{target}")
        for page in PAGES
        for number, target in links(page)
    ]


def shell_cases():
    return [
        pytest.param(page, number, body, id=f"{rel(page)}:{number}")
        for page in PAGES
        for number, tag, body in scan(page)[1]
        if tag in SHELL_TAGS
    ]


def test_pages_found():
    assert README.is_file()
    assert DOCS, "docs/*.md: no pages"
    assert link_cases() and shell_cases()


@pytest.mark.parametrize(("page", "number", "target"), link_cases())
def test_link_resolves(page: Path, number: int, target: str):
    where = f"{rel(page)}:{number}: link {target!r}"
    assert target, f"{where}: empty target"
    url = urlparse(target)
    if url.scheme:
        assert url.scheme in ("http", "https", "mailto"), f"{where}: unexpected scheme"
        assert not re.search(r"\s", target), f"{where}: whitespace in the URL"
        if url.scheme != "mailto":
            host = url.hostname or ""
            assert "." in host or host == "localhost", f"{where}: no host name"
        return
    assert not target.startswith("/"), f"{where}: absolute path; link relative to the page"
    file_part, _, anchor = target.partition("#")
    destination = (page.parent / unquote(file_part.split("?")[0])).resolve() if file_part else page
    assert destination.is_relative_to(ROOT), f"{where}: points outside the repository"
    assert destination.exists(), f"{where}: {rel(destination)} does not exist"
    if anchor and destination.suffix == ".md":
        assert unquote(anchor) in anchors(destination), (
            f"{where}: no heading with anchor #{anchor} in {rel(destination)}"
        )


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
@pytest.mark.parametrize(("page", "number", "body"), shell_cases())
def test_shell_block_parses(page: Path, number: int, body: str):
    done = subprocess.run(["bash", "-n"], input=body, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, (
        f"{rel(page)}:{number}: not valid bash (tag output as ```console or ```text):\n{done.stderr}"
    )


def test_readme_is_short():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_readme_links_every_docs_page():
    linked = {
        (README.parent / target.partition("#")[0]).resolve()
        for _, target in links(README)
        if not urlparse(target).scheme
    }
    missing = [rel(page) for page in DOCS if page.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"


@pytest.mark.parametrize("page", DOCS, ids=rel)
def test_docs_page_starts_with_title_and_summary(page: Path):
    lines = page.read_text(encoding="utf-8").splitlines()
    assert lines and lines[0].startswith("# "), f"{rel(page)}: first line is not a '# ' title"
    summary = next((line for line in lines[1:] if line.strip()), "")
    assert summary and not summary.startswith(("#", "```", "|", "-")), (
        f"{rel(page)}: the title is not followed by a summary paragraph"
    )
