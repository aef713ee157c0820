"""The front door: README.md under ~250 lines, and every link and image path of the docs works."""

import re

import pytest
from cli_helpers import ROOT

DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for heading in re.findall(r"^#+ (.+)$", markdown, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, len(lines)
    text = "\n".join(lines)
    for page in ("docs/library.md", "docs/cli.md", "docs/results.md", "docs/architecture.md", "CONTRIBUTING.md"):
        assert f"]({page})" in text, page


def test_every_relative_link_and_image_path_works():
    broken = []
    for doc in DOCS:
        text = doc.read_text()
        for target in LINK.findall(text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            page = (doc.parent / path).resolve() if path else doc
            if not page.exists():
                broken.append(f"{doc.name}: {target} (no such file)")
            elif anchor and page.suffix == ".md" and anchor not in anchors(page.read_text()):
                broken.append(f"{doc.name}: {target} (no such heading)")
    assert not broken, broken


@pytest.mark.slow  # collects the whole suite: one pytest start-up per command
def test_the_pytest_commands_of_contributing_work():
    """Each `python -m pytest ...` command CONTRIBUTING.md gives is accepted as given (collected, not run)."""
    import shlex
    import subprocess
    import sys

    text = (ROOT / "CONTRIBUTING.md").read_text()
    commands = re.findall(r"`\.venv/bin/python (-m pytest[^`]*)`", text)
    assert len(commands) >= 3, commands  # the fast tier, one test, one file
    for command in commands:
        args = [sys.executable, *shlex.split(command), "--collect-only", "-p", "no:cacheprovider"]
        result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{command}:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
