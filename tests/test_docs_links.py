"""The README's and docs' links to each other, their sections and their images lead somewhere: a section
renamed or a figure moved would otherwise leave a dead link that only a reader finds."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCED = re.compile(r"^```.*?^```", re.S | re.M)


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens, and a
    repeated heading numbered (``-1``, ``-2`` …)."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6}\s+(.+)$", FENCED.sub("", markdown), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found


def dead_links(page: Path) -> list[str]:
    """The page's links to files of this repository (and their sections) that do not exist."""
    dead = []
    for target in LINK.findall(FENCED.sub("", page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: …: not this repository's
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.is_file():
            dead.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text(encoding="utf-8")):
            dead.append(f"{target} (no such section in {linked.name})")
    return dead


def test_every_link_between_the_readme_and_the_docs_leads_somewhere() -> None:
    links = sum(len(LINK.findall(page.read_text(encoding="utf-8"))) for page in PAGES)
    assert links >= 30, "the pages link to each other and to their figures"
    assert {page.name: dead for page in PAGES if (dead := dead_links(page))} == {}


def test_a_dead_link_is_found(tmp_path: Path) -> None:
    """The check itself: a renamed section, a missing figure, a missing page; a repeated heading's second
    anchor and a link into code are told apart."""
    (tmp_path / "other.md").write_text("# Title\n\n## A site — and its `token`\n\n## Again\n\n## Again\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#a-site--and-its-token) [ok](other.md#again-1) [web](https://example.org/x)\n"
                    "[renamed](other.md#a-site) ![figure](images/missing.png) [page](gone.md)\n"
                    "```\n[in code](nowhere.md)\n```\n")
    assert dead_links(page) == ["other.md#a-site (no such section in other.md)", "images/missing.png (no such file)",
                                "gone.md (no such file)"]
