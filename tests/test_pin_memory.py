"""One pin-memory rule for every loader: pinned batches only where they go to a CUDA device."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from omegaconf import OmegaConf
from torch.utils.data import DistributedSampler, TensorDataset

from data import EpochSeeded
from engine.run.runtime import DistInfo
from engine.run.session import Session
from engine.training.loop import TrainState, eval_loader
from engine.training.setup import epoch_loader


def session_on(device: str) -> Session:
    return Session(
        device=torch.device(device),
        dtype=None,
        info=DistInfo(),
        model=nn.Identity(),
        inputs={},
        prepare=nn.Identity(),
        workers=0,
        eval_batch_size=2,
    )


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_training_and_evaluation_loaders_pin_memory_by_the_same_rule(device):
    """Not by whether this machine has a GPU: a CPU run on a GPU machine pins nothing, a CUDA run always pins."""
    session = session_on(device)
    data = TensorDataset(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
    train_set = EpochSeeded(data, 0)
    run = SimpleNamespace(
        cfg=OmegaConf.create({"trainer": {"batch_size": 2}, "seed": 0}),
        sampler=DistributedSampler(train_set, num_replicas=1, rank=0),
        train_set=train_set,
        state=TrainState(),
        drop_last=False,
        session=session,
    )
    pinned = device == "cuda"
    assert eval_loader(data, session).pin_memory is pinned
    assert epoch_loader(run, 0).pin_memory is pinned
