"""Run by tests/test_ranks.py under torchrun: two gloo ranks on the CPU build the same training run and report,
in OUT/rank<R>.json, what they drew and how often DDP averaged gradients across them.

    torchrun --nproc_per_node=2 tests/ranks_child.py OUT
"""

import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from cli_helpers import SMOKE, compose_config
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from engine.run.checkpoint import load_checkpoint
from engine.run.runtime import barrier
from engine.run.session import open_session
from engine.tasks.train import save
from engine.training.loop import GracefulStop, train_one_epoch
from engine.training.setup import build_run, epoch_loader, restore_random_state

OVERRIDES = [
    "task=train",
    *SMOKE,
    "model.drop_path=0.1",  # drop path draws from torch's generator on every forward in training
    "trainer.optimizer=sgd",  # an update proportional to the gradient: rounding stays rounding
    "trainer.weight_decay=0",
    "trainer.batch_size=4",
    "trainer.accum_steps=2",
    "trainer.epochs=1",
    "dataset.train_size=64",
]


def train_four_batches(folder: Path) -> dict:
    """Open the session as every task does (its weights before DDP's wrapper broadcasts rank 0's), build the run as
    task=train does, draw one training forward, then train 4 batches (2 optimizer steps)."""
    cfg = compose_config(*OVERRIDES)
    built = open_session(cfg, int(cfg.dataset.num_classes)).model.state_dict()
    initial = [value.double().sum().item() for value in built.values()]
    run = build_run(cfg, folder, None)
    session = run.session
    images = torch.linspace(-1, 1, 32 * 3 * 32 * 32).reshape(32, 3, 32, 32)  # the same images on every rank
    session.model.train()
    with torch.no_grad():
        drawn = session.model(images).sum().item()  # differs only by the drop-path masks drawn
    averaged_batches = []

    def counting_allreduce(state, bucket):
        if bucket.is_last():  # one per backward that averages gradients across the ranks
            averaged_batches.append(run.state.step_in_epoch)
        return allreduce_hook(state, bucket)

    run.model.register_comm_hook(None, counting_allreduce)
    train_one_epoch(run, epoch_loader(run, 0), GracefulStop(), writer=None, max_steps=4)
    weights = [value.tolist() for value in session.model.state_dict().values()]
    save(run, best=False)  # last.pt, as an interrupted run saves it
    barrier(session.info)
    next_draws = torch.rand(8).tolist()  # what this rank draws next ...
    restore_random_state(load_checkpoint(run.ckpt_dir / "last.pt"), 0, session.info)
    return {
        "draws_after_resume": [next_draws, torch.rand(8).tolist()],  # ... and after a resume from last.pt
        "rank": session.info.rank,
        "initial": initial,
        "drop_path_forward": drawn,
        "averaged_at_batches": averaged_batches,
        "updates": run.state.num_updates,
        "weights": weights,
    }


def main(out: Path) -> None:
    report = train_four_batches(out / "with_no_sync")
    DistributedDataParallel.no_sync = lambda self: nullcontext()  # every backward averages: the reference
    report["weights_averaging_every_batch"] = train_four_batches(out / "without")["weights"]
    (out / f"rank{report['rank']}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
