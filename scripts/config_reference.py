"""Write docs/cli.md's configuration reference from the schema (engine/schema.py): every key, what it takes, its
default (the value `python main.py` composes: cifar10 and the default model; other data sets and presets give
their own) and its line of help.

    python scripts/config_reference.py           # rewrite the table in docs/cli.md
    python scripts/config_reference.py --check   # exit 1 when docs/cli.md's table differs (a test runs this)
"""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omegaconf import OmegaConf  # noqa: E402

from engine.schema import Config, register, schema_field, takes  # noqa: E402

DOC = ROOT / "docs" / "cli.md"
START = "<!-- the configuration reference: written by scripts/config_reference.py from engine/schema.py -->"
END = "<!-- end of the configuration reference -->"


def default_config() -> dict[str, Any]:
    """`python main.py`'s config, interpolations as written."""
    from hydra import compose, initialize_config_dir

    from engine.run.folder_claim import run_id

    register()
    OmegaConf.register_new_resolver("run_id", run_id, replace=True)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config")
    return OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)  # type: ignore[return-value]


def keys() -> list[str]:
    """Every key of the schema, in its order: the top-level ones, then each group's."""
    top = [f.name for f in fields(Config) if schema_field(f.name).metadata.get("help")]
    groups = [f for f in fields(Config) if not schema_field(f.name).metadata.get("help")]
    return top + [f"{group.name}.{inner.name}" for group in groups for inner in fields(group.default_factory())]


def shown(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, dict)):
        return f"`{value}`".replace("'", "")
    return f"`{value}`" if "${" in str(value) else str(value)


def table() -> str:
    config = default_config()
    rows = ["| key | takes | default | meaning |", "|---|---|---|---|"]
    for key in keys():
        group, _, name = key.rpartition(".")
        value = config[group][name] if group else config[key]
        said = (takes(key) or "").removeprefix("takes ")
        rows.append(f"| `{key}` | {said} | {shown(value)} | {schema_field(key).metadata['help']} |")
    return "\n".join(rows)


def written(text: str) -> str:
    """docs/cli.md with the table between the markers written anew."""
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    return f"{before}{START}\n{table()}\n{END}{after}"


def main(argv: list[str]) -> int:
    text = DOC.read_text()
    new = written(text)
    if "--check" in argv:
        if new != text:
            print("docs/cli.md's configuration reference differs from the schema: run scripts/config_reference.py")
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
