"""Run by tests/test_offline.py in a child process whose environment (HF_HOME, HF_HUB_OFFLINE) huggingface_hub
reads at import, as on a compute node. Every network attempt fails and is counted.

    python tests/offline_child.py OUT.json CWD OVERRIDE...

runs `main.py OVERRIDE...` in CWD, then builds the model group's model and data config the way every task does,
and writes to OUT.json: the exit code, stderr, the network attempts, the data config's mean/std/interpolation;
the built model's weights go to OUT.json's folder as weights.safetensors.
"""

import json
import socket
import sys
from pathlib import Path

ATTEMPTS: list[str] = []


def _refuse(*args, **kwargs):
    ATTEMPTS.append(repr(args[:2]))
    raise OSError("network attempt in an offline test")


socket.getaddrinfo = _refuse
socket.create_connection = _refuse
socket.socket.connect = _refuse  # type: ignore[method-assign]

from cli_helpers import compose_config, run_main  # noqa: E402


def main(out: Path, cwd: Path, overrides: list[str]) -> None:
    result = run_main(*overrides, cwd=cwd, check=False)
    report = {"returncode": result.returncode, "stderr": result.stderr, "stdout": result.stdout}
    if result.returncode == 0:
        from safetensors.torch import save_file

        from engine.models.build import build_model, data_config

        cfg = compose_config(*overrides)
        model = build_model(cfg.model, cfg.tome, int(cfg.dataset.num_classes))
        inputs = data_config(model, cfg.model, cfg.dataset)
        report |= {key: inputs[key] for key in ("mean", "std", "interpolation")}
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out.parent / "weights.safetensors"))
    report["network_attempts"] = ATTEMPTS
    out.write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
