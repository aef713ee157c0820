"""task=eval: accuracy and images/s of a checkpoint or of pretrained weights; per-sample predictions in data
set order (predictions.csv). The loop itself is `engine.training.evaluation`."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from data import build_datasets, count_classes

from ..errors import UserError
from ..models.build import WEIGHTS_HINT, has_weights
from ..run.folder_claim import atomic_write
from ..run.overrides import config_from_checkpoint, label_order
from ..run.results import r_that_ran, run_record, write_results
from ..run.session import open_session
from ..training.evaluation import eval_loader, evaluate

log = logging.getLogger(__name__)
PREDICTION_COLUMNS = ("index", "target", "pred", "correct", "prob")


def write_predictions(path: Path, rows: list[tuple]) -> None:
    """predictions.csv, written whole or not at all."""

    def write(f: Any) -> None:
        writer = csv.writer(f)
        writer.writerow(PREDICTION_COLUMNS)
        writer.writerows((i, t, p, c, f"{prob:.6f}") for i, t, p, c, prob in rows)

    atomic_write(path, write, text=True)


def run(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """task=eval: accuracy and images/s of a checkpoint (rebuilt from its saved config) or of pretrained weights."""
    cfg, saved = config_from_checkpoint(cfg, overrides)
    if saved is None and not has_weights(cfg.model):
        raise UserError(f"task=eval needs weights: {WEIGHTS_HINT}")
    classes = label_order(cfg.dataset, saved)
    session = open_session(cfg, count_classes(cfg.dataset), saved.weights if saved else None, cfg.ckpt)
    dataset = build_datasets(
        cfg.dataset, session.inputs, augment=False, splits=("val",), seed=cfg.seed, classes=classes
    )["val"]
    loader = eval_loader(dataset, session)
    predictions: list[tuple] = []
    metrics = evaluate(
        session.runner(),  # compiled when runtime.compile asks
        loader,
        session.device,
        session.dtype,
        session.info,
        prepare=session.prepare,
        predictions=predictions,
    )
    record = run_record(
        cfg,
        session,
        metrics,
        session.eval_batch_size,
        extra={
            "checkpoint": cfg.ckpt,
            "trained_with": saved.trained_with if saved else None,
            "world_size": session.info.world_size,
            "predictions": "predictions.csv",
            "compile": session.compile,
        },
    )
    if session.info.is_main:
        write_results(run_dir, record)
        write_predictions(run_dir / "predictions.csv", predictions)
        log.info(
            "top-1 %.2f  top-5 %.2f  %.1f img/s  %.2f GFLOPs  r=%s  protect=%s%s -> %s",
            metrics["top1"],
            metrics["top5"],
            metrics["images_per_s"],
            record["gflops"],
            r_that_ran(record),
            record["protect"],
            f"  compiled ({session.compile})" if session.compile else "",
            run_dir / "results.json",
        )
    return record
