"""One accuracy rule: training's running accuracy, validation and task=eval count top-1 alike, ties included."""

from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from engine.run.runtime import DistInfo
from engine.run.session import Session
from engine.training.loop import Optimization, TrainState, evaluate, top_classes, train_step


class FixedLogits(nn.Module):
    """Returns the logits it was built with, whatever the images (a weight keeps backward meaningful)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits[: len(images)] * self.scale


def test_top_classes_against_a_brute_force_count():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 10, generator=generator)  # continuous: no ties
    targets = torch.randint(0, 10, (64,), generator=generator)
    order = np.argsort(-logits.numpy(), axis=1)
    expected_top1 = int((order[:, 0] == targets.numpy()).sum())
    expected_top5 = int((order[:, :5] == targets.numpy()[:, None]).any(axis=1).sum())
    hits = top_classes(logits) == targets[:, None]
    assert int(hits[:, 0].sum()) == expected_top1
    assert int(hits.any(dim=1).sum()) == expected_top5
    assert top_classes(logits[:, :3]).shape == (64, 3)  # fewer classes than k


def test_training_and_evaluation_count_tied_logits_by_one_written_rule():
    """Equal logits: the lower class index is the prediction, in training's running accuracy and in evaluation,
    each checked against numpy's stable sort (a reference that is not top_classes)."""
    logits = torch.zeros(12, 4)  # every class tied
    logits[6:, 1] = logits[6:, 2] = 1.0  # two classes tied at the top
    targets = torch.tensor([0, 1, 2, 3] * 3)
    order = np.argsort(-logits.numpy(), axis=1, kind="stable")
    expected_top1 = 100 * float((order[:, 0] == targets.numpy()).mean())
    assert expected_top1 == 100 * 3 / 12  # predicted 0 in rows 0-5 (targets 0 at rows 0, 4), 1 in rows 6-11 (row 9)
    model = FixedLogits(logits)
    opt = Optimization(
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        scheduler=None,
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        loss_fn=nn.CrossEntropyLoss(),
        amp_autocast=nullcontext,
    )
    state = TrainState()
    train_step(model, torch.zeros(12, 3, 2, 2), targets, opt, state, update=False)
    loader = DataLoader(TensorDataset(torch.zeros(12, 3, 2, 2), targets), batch_size=12)
    session = Session(
        device=torch.device("cpu"),
        dtype=None,
        info=DistInfo(),
        model=model,
        inputs={},
        prepare=nn.Identity(),
        workers=0,
        eval_batch_size=12,
    )
    metrics = evaluate(model, loader, session)
    assert state.epoch_sums["samples"] == 12 and 100 * state.epoch_sums["correct"] / 12 == expected_top1
    assert metrics["top1"] == expected_top1
    assert metrics["top5"] == 100.0  # 4 classes: every target is in the top 4
