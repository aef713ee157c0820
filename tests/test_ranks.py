"""Several ranks (two gloo processes under torchrun on the CPU, tests/ranks_child.py): the same initial weights,
their own random draws, and one gradient average per optimizer step under gradient accumulation."""

import json
import os
import subprocess
import sys

import pytest
from cli_helpers import ROOT

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    command = [*TORCHRUN, str(ROOT / "tests" / "ranks_child.py"), str(out)]
    result = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_ranks_start_from_the_same_weights_and_draw_their_own_drop_path_masks(ranks):
    assert ranks[0]["initial"] == ranks[1]["initial"]
    assert ranks[0]["drop_path_forward"] != ranks[1]["drop_path_forward"]  # same weights and images: masks differ


@pytest.mark.slow
def test_a_resumed_rank_continues_its_own_random_stream(ranks):
    """last.pt holds every rank's random state: each rank draws after a resume what it would have drawn."""
    for rank in ranks:
        uninterrupted, resumed = rank["draws_after_resume"]
        assert resumed == uninterrupted
    assert ranks[0]["draws_after_resume"][0] != ranks[1]["draws_after_resume"][0]


@pytest.mark.slow
def test_gradient_accumulation_averages_across_ranks_once_per_optimizer_step(ranks):
    for rank in ranks:  # 4 batches, accum_steps=2: averaged in the backward of batches 2 and 4 only
        assert rank["updates"] == 2 and rank["averaged_at_batches"] == [1, 3]  # step_in_epoch before the step ends
    assert ranks[0]["weights"] == ranks[1]["weights"]  # DDP kept the ranks in step
    difference = max(
        abs(a - b)
        for kept, every in zip(ranks[0]["weights"], ranks[0]["weights_averaging_every_batch"])
        for a, b in zip(_flat(kept), _flat(every))
    )
    assert difference <= 1e-6  # the same weights as averaging after every batch


def _flat(value) -> list[float]:
    return [x for item in value for x in _flat(item)] if isinstance(value, list) else [value]
