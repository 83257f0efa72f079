"""What notebooks 02 and 03 share: the fast-mode switch, their recipe, and a per-step record.

`Trainer.fit()` logs one line per epoch; the collapse study of the paper's Figure 7 wants the
teacher entropy and KL at every step, so `record()` runs `fit()` with its `on_step` hook and keeps
what each step returns.
"""

import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import dino  # noqa: E402

# DINO_FAST=1 (the test suite) shrinks data and steps so each notebook runs in about a minute
FAST = os.environ.get("DINO_FAST", "0") not in ("", "0")
SEED = int(os.environ.get("DINO_SEED", "0"))

# The collapse notebooks' recipe: `python dino.py`'s preset for shapes with 2 local views instead
# of 4 and the paper's ViT head (no BatchNorm); every value is a Config field, hence a flag.
BASE = dict(
    arch="vit_nano", patch_size=4, drop_path_rate=0.0,             # a 4-block ViT, 64 wide
    global_crops_size=32, local_crops_size=16, local_crops_number=2,  # 2 global + 2 local views
    out_dim=1024, hidden_dim=512, bottleneck_dim=128,                # K = 1024
    batch_size=32, epochs=3, lr=0.008, warmup_epochs=1, freeze_last_layer=1,
    momentum_teacher=0.98, min_lr=5e-4,                              # λ: 0.98 → 1 (cosine)
    use_bn_in_head=False,  # the paper's ViT head: BatchNorm in it (the preset's) muddies the ablations
    student_temp=0.1, warmup_teacher_temp=0.04, teacher_temp=0.04,   # τ_s = 0.1, τ_t = 0.04
    centering=True, seed=SEED, device="cpu", save_every=0,
)
if FAST:  # 120 steps of 16 colour images, 2 global views only (notebook 02 says why)
    BASE.update(local_crops_number=0, out_dim=512, batch_size=16, lr=0.016,
                momentum_teacher=0.99, min_lr=1e-6)


def make_trainer(train, evaluation, **change) -> dino.Trainer:
    """A Trainer for BASE with `change`, writing its checkpoint and log to a fresh temporary folder
    (record() removes it when the run is done)."""
    output_dir = tempfile.mkdtemp(prefix="dino_notebook_")
    cfg = dino.make_config({**BASE, **change, "output_dir": output_dir}, image_size=32, name="shapes")
    return dino.Trainer(cfg, train, evaluation, quiet=True)


def record(trainer: dino.Trainer) -> dict:
    """trainer.fit(), keeping the loss, h(P_t) and KL of every step and the final k-NN."""
    steps = dict(loss=[], teacher_entropy=[], kl=[])

    def keep(iteration, loss, stats):
        steps["loss"].append(loss.item())
        steps["teacher_entropy"].append(stats["teacher_entropy"].item())
        steps["kl"].append(stats["kl"].item())

    started = time.time()
    history = trainer.fit(log=lambda *_: None, on_step=keep)
    shutil.rmtree(trainer.cfg.output_dir, ignore_errors=True)  # scratch: the trainer stays in memory
    result = dict(steps, log_K=math.log(trainer.cfg.out_dim), seconds=time.time() - started)
    if "knn_top1" in history[-1]:
        result["knn_top1"] = history[-1]["knn_top1"]
    return result
