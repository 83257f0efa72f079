"""--steps and --time_limit: the schedules are laid over the run's T iterations (the authors'
shapes squeezed or stretched onto T), a time-limited run measures its speed and plans T so that
its schedules end at its last step, and the clock stops a run that turns out slower."""

import json
import math

import numpy as np
import pytest
import torch

import data
import dino


def tiny(tmp_path, **changes):
    explicit = dict(arch="vit_nano", patch_size=8, global_crops_size=16, local_crops_size=8,
                    local_crops_number=2, out_dim=32, hidden_dim=24, bottleneck_dim=12,
                    batch_size=16, epochs=4, warmup_epochs=1, freeze_last_layer=1,
                    warmup_teacher_temp_epochs=2, momentum_teacher=0.9, min_lr=1e-5, device="cpu",
                    log_every=1, output_dir=str(tmp_path / "run"))
    return dino.make_config({**explicit, **changes}, 32, "shapes")


def authors_cosine(base, final, total, warmup):
    """The authors' cosine_scheduler for a run of `total` iterations, `warmup` of them warm-up."""
    i = np.arange(total - warmup)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * i / (total - warmup)))
    return np.concatenate([np.linspace(0, base, warmup), cosine])


def test_steps_lay_the_whole_plan_over_T():
    """T = 37 iterations for a plan of 10 epochs: every epoch of the schedules is 3.7 iterations,
    so the lr warm-up (2 epochs) is round(7.4) = 7 iterations, τ_t climbs over epochs 0-4 and
    the last layer is frozen for the iterations of epoch 0 (i < 3.7)."""
    cfg = dino.Config(epochs=10, warmup_epochs=2, warmup_teacher_temp_epochs=5, freeze_last_layer=1,
                      batch_size=256, steps=37)
    s = dino.schedules(cfg, steps_per_epoch=100)  # the data's epochs do not matter any more
    assert {len(v) for v in s.values()} == {37}
    np.testing.assert_allclose(s["lr"].numpy(), authors_cosine(0.0005, 1e-6, 37, 7), rtol=1e-7)
    np.testing.assert_allclose(s["momentum"].numpy()[7:], authors_cosine(0.996, 1.0, 37, 0)[7:], rtol=1e-7)
    epoch_of = np.floor(np.arange(37) / 3.7).astype(int)
    tau = np.linspace(0.04, 0.07, 5)[np.minimum(epoch_of, 4)]
    np.testing.assert_allclose(s["teacher_temp"].numpy(), tau, rtol=1e-7)
    assert s["freeze_last_layer"].tolist() == [True] * 4 + [False] * 33


def test_steps_equal_to_the_epochs_change_nothing():
    cfg = dino.Config(epochs=6, warmup_epochs=2, warmup_teacher_temp_epochs=3, freeze_last_layer=1)
    by_epochs = dino.schedules(cfg, steps_per_epoch=7)
    cfg.steps = 42
    by_steps = dino.schedules(cfg, steps_per_epoch=7)
    for name in by_epochs:
        assert torch.equal(by_epochs[name], by_steps[name]), name


def test_time_limit_plans_the_steps_and_the_schedules_end_at_the_last(tmp_path, monkeypatch):
    """Acceptance 3 of issue 17: the run measures its speed, sets T, trains exactly T steps and
    its schedules end there: lr at the end of its cosine (min_lr), λ at 1, τ_t at its final value.
    (The clock's guard is off here: on a busy machine it would stop the run early; next test.)"""
    cfg = tiny(tmp_path, time_limit=0.08)  # 4.8 s
    shapes = data.make_shapes(64, seed=0, size=32)
    trainer = dino.Trainer(cfg, shapes, None, quiet=True)
    monkeypatch.setattr(trainer, "should_stop", lambda step: None)
    trained = []
    trainer.fit(log=lambda *_: None, on_step=lambda i, loss, stats: trained.append(i))
    T = cfg.steps
    assert T >= 2 and T != cfg.epochs * trainer.steps_per_epoch  # planned, not the epochs' length
    assert trained == list(range(T)) and trainer.total_steps == T
    records = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    last = records[-1]
    assert last["iteration"] == T - 1
    peak = cfg.lr * cfg.batch_size / 256
    gap = 0.5 * (1 - math.cos(math.pi / (T - round(T / cfg.epochs))))  # the authors' cosine stops 1 step short
    assert last["lr"] == pytest.approx(cfg.min_lr, abs=gap * peak + 1e-12)
    assert last["momentum"] == pytest.approx(1.0, abs=gap * 0.1 + 1e-12)
    assert last["teacher_temp"] == pytest.approx(cfg.teacher_temp)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["steps"] == T  # so a resume keeps the same plan
    # the same command again: resumes the planned run, which is done
    again = dino.Trainer(tiny(tmp_path, time_limit=0.08), shapes, None, quiet=True)
    assert again.resume(log=lambda *_: None)
    assert again.total_steps == T and again.cfg.steps == T


def test_the_clock_stops_a_run_that_is_slower_than_planned(tmp_path):
    """--steps fixes T; --time_limit then only guards: the run stops inside its epoch at the limit
    and saves that position, so the same command resumes there."""
    cfg = tiny(tmp_path, steps=100_000, time_limit=0.03, epochs=1)  # 1.8 s for 100,000 steps
    shapes = data.make_shapes(64, seed=0, size=32)
    trainer = dino.Trainer(cfg, shapes, None, quiet=True)
    said = []
    trainer.fit(log=said.append)
    checkpoint = data.load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    done = checkpoint["epoch"] * trainer.steps_per_epoch + checkpoint["step"]
    assert 0 < done < 100_000
    assert any("--time_limit 0.03 min reached" in line for line in said)
    assert trainer.training_seconds() < 0.03 * 60 + 5
