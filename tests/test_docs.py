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


@pytest.mark.slow  # one pytest start-up per command
def test_the_pytest_commands_of_contributing_work():
    """Each `python -m pytest ...` command CONTRIBUTING.md gives is accepted as given (collected, not run)."""
    import shlex
    import subprocess
    import sys

    text = (ROOT / "CONTRIBUTING.md").read_text()
    commands = re.findall(r"`\.venv/bin/python (-m pytest[^`]*)`", text)
    assert len(commands) >= 3, commands  # the fast tier, one test, one file
    for command in commands:  # collected in this process (-n0), the whole suite's collection left to CI
        words = shlex.split(command)
        where = [] if any(w.startswith("tests/") for w in words) else ["tests/test_docs.py"]
        # --noconftest: no torch import where the collected file needs none (the options are what is checked)
        args = [sys.executable, *words, *where, "--collect-only", "-n0", "-p", "no:cacheprovider", "--noconftest"]
        result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
        # 0: collected; 5: nothing here to collect (-m cuda on test_docs.py); 4 would be a usage error
        assert result.returncode in (0, 5), f"{command}:\n{result.stdout[-2000:]}{result.stderr[-2000:]}"


def config_keys() -> set[str]:
    """Every key `python main.py` composes from the schema and configs/: the top-level ones and each group's
    (`group.key`; hydra is Hydra's; kwargs and architecture are free-form)."""
    from cli_helpers import compose_config
    from omegaconf import OmegaConf

    def walk(node: dict, prefix: str) -> set[str]:
        keys = set()
        for key, value in node.items():
            if isinstance(value, dict) and key not in ("kwargs", "architecture"):
                keys |= walk(value, f"{prefix}{key}.")
            else:
                keys.add(f"{prefix}{key}")
        return keys

    return walk(OmegaConf.to_container(compose_config(), resolve=False), "")


def reference_keys() -> set[str]:
    """The keys docs/cli.md's configuration reference names: `group.key`, then bare names of the same group."""
    text = (ROOT / "docs" / "cli.md").read_text()
    table = text.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    keys = set()
    for row in table.splitlines():
        if not row.startswith("| `"):
            continue
        prefix = ""
        for name in re.findall(r"`([^`]+)`", row.split("|")[1]):
            if "." in name:
                prefix = name.rsplit(".", 1)[0] + "."
                keys.add(name)
            else:
                keys.add(f"{prefix}{name}")
    return keys


def test_the_configuration_reference_names_every_key_and_only_keys():
    configs, documented = config_keys(), reference_keys()
    assert not configs - documented, f"keys missing from docs/cli.md's reference: {sorted(configs - documented)}"
    assert not documented - configs, f"docs/cli.md names keys no config has: {sorted(documented - configs)}"


@pytest.mark.parametrize("group", ["dataset", "model", "tome", "runtime"])
def test_each_config_groups_row_in_cli_md_names_every_key_it_has(group):
    """docs/cli.md's table of config groups lists each group's keys: every key of its schema."""
    from engine.schema import KEYS

    keys = {key.split(".", 1)[1] for key in KEYS if key.startswith(f"{group}.")}
    (row,) = [
        line for line in (ROOT / "docs" / "cli.md").read_text().splitlines() if line.startswith(f"| `{group}/` |")
    ]
    listed = set(re.findall(r"`(\w+)`", row.split(" | ")[-1]))
    assert keys <= listed, sorted(keys - listed)
