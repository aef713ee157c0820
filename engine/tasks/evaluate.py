"""task=eval: accuracy and images/s of a checkpoint (rebuilt from its saved config) or of pretrained weights,
and per-sample predictions in data set order (predictions.csv); the loop is `engine.training.loop.evaluate`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from data import build_datasets, count_classes

from ..errors import UserError
from ..models.build import WEIGHTS_HINT, has_weights
from ..report import write_csv
from ..run.checkpoint import config_from_checkpoint, label_order
from ..run.results import r_that_ran, run_record, write_results
from ..run.session import open_session
from ..training.loop import eval_loader, evaluate

log = logging.getLogger(__name__)


def run(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    cfg, saved = config_from_checkpoint(cfg, overrides)
    if saved is None and not has_weights(cfg.model):
        raise UserError(f"task=eval needs weights: {WEIGHTS_HINT}")
    classes = label_order(cfg.dataset, saved)
    session = open_session(cfg, count_classes(cfg.dataset), saved.weights if saved else None, cfg.ckpt)
    val = build_datasets(cfg.dataset, session.inputs, augment=False, splits=("val",), seed=cfg.seed, classes=classes)
    loader, runner = eval_loader(val["val"], session), session.runner()  # compiled when runtime.compile asks
    predictions: list[tuple] = []  # one row per sample, in data set order
    metrics = evaluate(runner, loader, session, predictions=predictions)
    extra = {"checkpoint": cfg.ckpt, "trained_with": saved.trained_with if saved else None}
    extra |= {"world_size": session.info.world_size, "predictions": "predictions.csv", "compile": session.compile}
    record = run_record(cfg, session, metrics, session.eval_batch_size, extra)
    if session.info.is_main:
        write_results(run_dir, record)
        columns = ["index", "target", "pred", "correct", "prob"]
        rows = (dict(zip(columns, (i, t, p, c, f"{prob:.6f}"))) for i, t, p, c, prob in predictions)
        write_csv(run_dir / "predictions.csv", rows, columns)  # written whole or not at all
        compiled = f"  compiled ({session.compile})" if session.compile else ""
        log.info(
            f"top-1 {metrics['top1']:.2f}  top-5 {metrics['top5']:.2f}  {metrics['images_per_s']:.1f} img/s  "
            f"{record['gflops']:.2f} GFLOPs  r={r_that_ran(record)}  protect={record['protect']}{compiled} "
            f"-> {run_dir / 'results.json'}"
        )
    return record
