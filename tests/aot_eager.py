"""torch.compile on the aot_eager backend, for the tests: the same tracing (dynamo) and autograd (AOT) as
inductor without generating kernels, which takes minutes on a CPU. Inductor itself is run by
tests/test_patch.py (the patched forward) and on CUDA by tests/test_cuda.py.

In this process: `use_aot_eager(monkeypatch)`. In another (torchrun): `python tests/aot_eager.py main.py ARGS`
runs main.py with the same replacement.
"""

from __future__ import annotations

import runpy
import sys

import torch

_inductor_compile = torch.compile


def aot_eager_compile(model, mode=None, **kwargs):
    """torch.compile(model, mode=..., ...) as the CLI calls it, on aot_eager (modes are inductor's)."""
    return _inductor_compile(model, backend="aot_eager", **kwargs)


def use_aot_eager(monkeypatch) -> None:
    monkeypatch.setattr(torch, "compile", aot_eager_compile)
    torch._dynamo.reset()


if __name__ == "__main__":
    torch.compile = aot_eager_compile
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
