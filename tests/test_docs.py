"""The user's documents hold together: README keeps the test command CI runs and stays a user's document, and
every relative link in README, docs/ and the benchmark results resolves to a file and, where it names one, to
an anchor of that file."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
ANCHOR = re.compile(r"""<a\s+(?:id|name)=["']([^"']+)["']""")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
            *sorted((ROOT / "benchmarks" / "results").rglob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    return set(ANCHOR.findall(text)) | {slug(h) for h in HEADING.findall(FENCE.sub("", text))}


def links(path: Path) -> list[str]:
    prose = CODE.sub("``", FENCE.sub("", path.read_text(encoding="utf-8")))
    return [t for t in LINK.findall(prose) if not re.match(r"[a-z][a-z+.-]*:", t)]  # skip https:, mailto:


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    bad = []
    for target in links(path):
        name, _, anchor = target.partition("#")
        file = (path.parent / name).resolve() if name else path
        if not file.exists():
            bad.append(f"{path.relative_to(root)}: {target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            bad.append(f"{path.relative_to(root)}: {target} (no such anchor)")
    return bad


def test_every_relative_link_in_the_documents_resolves():
    bad = [line for path in documents() for line in broken_links(path)]
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_the_link_check_sees_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "b.md").write_text('# Title\n\n<a id="kept"></a>\n## A `cpu` heading: here\n')
    page = tmp_path / "a.md"
    page.write_text("[ok](b.md#title) [ok](b.md#kept) [ok](b.md#a-cpu-heading-here) [web](https://x.org/y)\n"
                    "`[in code](gone.md)`\n[bad](gone.md) [bad](b.md#nowhere) ![bad](plots/x.png)\n")
    bad = [line.split(": ", 1)[1] for line in broken_links(page, tmp_path)]
    assert bad == ["gone.md (no such file)", "b.md#nowhere (no such anchor)", "plots/x.png (no such file)"]


def test_readme_keeps_the_test_command_that_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    setup = (ROOT / "README.md").read_text().split("## Set up", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)\n```", setup, re.S)
    assert blocks[1].strip() == ci == 'pip install -e ".[test]" && python -m pytest --durations=15'


def test_readme_is_a_users_document():
    """At most 300 lines, code within its first 60; results live in docs/results.md."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300
    assert "```python" in lines[:60]
