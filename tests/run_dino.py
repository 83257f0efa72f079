"""`python dino.py ARGS` with hooks for tests/test_scale.py, each set by an environment variable:

  DINO_TEST_DUMP=DIR          at the end, save this process's teacher and center to DIR/rank<r>.pth
  DINO_TEST_KILL_AT=it        SIGKILL this process just before training iteration `it`
  DINO_TEST_SIGINT_AT=it      send this process SIGINT (as Ctrl-C does) just before iteration `it`
  DINO_TEST_KILL_IN_SAVE=n    the n-th checkpoint save writes half its file, then SIGKILLs the process
  DINO_TEST_NAN_AT=it         the loss is NaN from iteration `it` on
  DINO_TEST_SIGNAL_IN_STEP=SIG:n  send this process signal SIG (INT, TERM) as train_step is called
                              the n-th time, counting the steps --time_limit times at the start

The kills are real SIGKILLs; the hooks only choose the moment, so the tests are deterministic.
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

import checkpoint  # noqa: E402
import data  # noqa: E402
import dino  # noqa: E402

env = lambda name: int(os.environ[name]) if name in os.environ else None  # noqa: E731
trainers = []

original_init = dino.Trainer.__init__
original_step = dino.Trainer.step
original_save = checkpoint.save_checkpoint
original_loss = dino.dino_loss
original_train_step = dino.train_step


def init(self, *args, **kwargs):
    original_init(self, *args, **kwargs)
    trainers.append(self)


def step(self, views, iteration):
    if iteration == env("DINO_TEST_KILL_AT"):
        os.kill(os.getpid(), signal.SIGKILL)
    if iteration == env("DINO_TEST_SIGINT_AT"):
        os.kill(os.getpid(), signal.SIGINT)
    self._it = iteration
    return original_step(self, views, iteration)


saves = [0]


def save_checkpoint(state, path):
    saves[0] += 1
    if saves[0] == env("DINO_TEST_KILL_IN_SAVE"):
        import io
        buffer = io.BytesIO()
        torch.save(state, buffer)
        with open(path.with_name(path.name + ".tmp"), "wb") as f:  # as save_checkpoint would
            f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    original_save(state, path)


def dino_loss(*args, **kwargs):
    loss, stats = original_loss(*args, **kwargs)
    trainer = trainers[-1]
    if env("DINO_TEST_NAN_AT") is not None and getattr(trainer, "_it", -1) >= env("DINO_TEST_NAN_AT"):
        loss = loss * float("nan")
    return loss, stats


train_steps = [0]


def train_step(*args, **kwargs):
    train_steps[0] += 1
    name, _, n = os.environ.get("DINO_TEST_SIGNAL_IN_STEP", ":").partition(":")
    if n and train_steps[0] == int(n):
        os.kill(os.getpid(), getattr(signal, f"SIG{name}"))
    return original_train_step(*args, **kwargs)


dino.Trainer.__init__ = init
dino.train_step = train_step
dino.Trainer.step = step
checkpoint.save_checkpoint = save_checkpoint
dino.dino_loss = dino_loss

if __name__ == "__main__":
    rank = int(os.environ.get("RANK", 0))
    try:
        code = dino.main(sys.argv[1:])
    except data.DinoError as e:
        sys.exit(f"error: {e}")
    if os.environ.get("DINO_TEST_DUMP") and trainers:
        t = trainers[-1]
        torch.save({"teacher": t.teacher.state_dict(), "center": t.center.cpu()},
                   Path(os.environ["DINO_TEST_DUMP"]) / f"rank{rank}.pth")
    sys.exit(code)
