"""Every relative link in the README, docs/*.md and benchmarks/README.md leads somewhere: the file exists, and a
`#anchor` names a heading of the target, spelled as GitHub spells heading anchors."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Files another branch is writing, linked from the README ahead of time. Remove an entry once its file is merged.
PENDING: set[str] = set()

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", flags=re.S | re.M)


def prose(path: Path) -> str:
    """The page without its fenced code blocks (a link or heading shown as code is not one)."""
    return FENCE.sub("", path.read_text(encoding="utf-8"))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (not - or _), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+?)#*$", prose(path), flags=re.M):
        base, n = slug(heading), 0
        while (name := base if n == 0 else f"{base}-{n}") in found:  # repeated headings get -1, -2, ...
            n += 1
        found.add(name)
    return found


def links(path: Path) -> list[str]:
    return [t for t in LINK.findall(prose(path)) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # not http:, mailto:


def test_slug_follows_github():
    assert slug("The CPU kernels and how they are chosen") == "the-cpu-kernels-and-how-they-are-chosen"
    assert slug("Measured: a training step and `mmap`, 2026-11-30") == "measured-a-training-step-and-mmap-2026-11-30"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    broken = []
    for target in links(page):
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            if path.relative_to(ROOT).as_posix() not in PENDING:
                broken.append(f"{target}: no such file")
            continue
        if anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: {path.relative_to(ROOT)} has no heading with the anchor #{anchor}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_pages_are_found():
    assert {"README.md", "training.md", "server.md"} <= {p.name for p in PAGES}
    assert len(links(ROOT / "README.md")) >= 10
