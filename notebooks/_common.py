"""What the notebooks share: the fast-mode switch and a training loop that records every step.

`Trainer.fit()` logs one line per epoch; the collapse study of the paper's Figure 7 wants the
teacher entropy and KL at every step, so `record()` runs the same `Trainer.train_step` that `fit()`
runs, over the same `dino.train_batches`, and keeps the numbers each step returns.
"""

import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import dino  # noqa: E402

# DINO_FAST=1 (the test suite) shrinks data and steps so each notebook runs in about a minute
FAST = os.environ.get("DINO_FAST", "0") not in ("", "0")


def record(trainer: dino.Trainer, knn: bool = True) -> dict:
    """Train for trainer.cfg.epochs epochs; return per-step loss, h(P_t), KL and the final k-NN."""
    cfg, started = trainer.cfg, time.time()
    steps = dict(loss=[], teacher_entropy=[], kl=[])
    trainer.student.train()
    for epoch in range(cfg.epochs):
        batches = dino.train_batches(trainer.train_set, cfg, epoch, trainer.device)
        for step, (views, _) in enumerate(batches):
            it = epoch * trainer.steps_per_epoch + step  # index into the per-step schedules
            loss, stats = trainer.train_step(views, it, epoch)
            steps["loss"].append(loss.item())
            steps["teacher_entropy"].append(stats["teacher_entropy"].item())
            steps["kl"].append(stats["kl"].item())
    result = dict(steps, log_K=math.log(cfg.out_dim), seconds=time.time() - started)
    if knn and trainer.eval_set is not None:
        result["knn_top1"] = trainer.knn()
    return result
