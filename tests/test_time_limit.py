"""--steps and --time_limit: the schedules are laid over the run's T iterations (the authors'
shapes squeezed or stretched onto T), a time-limited run measures its speed and plans T so that
its schedules end at its last step, and the clock stops a run that turns out slower."""

import json
import math
import time

import numpy as np
import pytest
import torch

import checkpoint
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
    """The time budget: the run measures its speed, sets T, trains exactly T steps and
    its schedules end there: lr at the end of its cosine (min_lr), λ at 1, τ_t at its final value.
    The speed is set (0.05 s/step) and the clock's guard is off, so that a busy machine changes
    nothing here; the measurement itself is timed in the next test, the guard in the one after."""
    cfg = tiny(tmp_path, time_limit=0.03, epochs=40)  # 1.8 s: 0.92 x 1.8 / 0.05 = 33 steps (< 40 epochs)
    shapes = data.make_shapes(64, seed=0, size=32)
    trainer = dino.Trainer(cfg, shapes, None, quiet=True)
    monkeypatch.setattr(trainer, "seconds_per_step", lambda: 0.05)
    monkeypatch.setattr(trainer, "should_stop", lambda step: None)
    trained = []
    trainer.fit(log=lambda *_: None, on_step=lambda i, loss, stats: trained.append(i))
    T = cfg.steps
    assert T in (32, 33) and T != cfg.epochs * trainer.steps_per_epoch  # planned, not the epochs' length
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
    again = dino.Trainer(tiny(tmp_path, time_limit=0.03, epochs=40), shapes, None, quiet=True)
    assert again.resume(log=lambda *_: None)
    assert again.total_steps == T and again.cfg.steps == T


def test_a_time_limit_never_makes_a_run_longer_than_its_epochs(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, time_limit=0.03, epochs=2)  # 34 steps would fit; 2 epochs are 8
    trainer = dino.Trainer(cfg, data.make_shapes(64, seed=0, size=32), None, quiet=True)
    monkeypatch.setattr(trainer, "seconds_per_step", lambda: 0.05)
    said = []
    trainer.fit(log=said.append)
    assert trainer.total_steps == 8 == 2 * trainer.steps_per_epoch
    assert any("all 2 epochs fit (8 steps" in line for line in said)


def test_the_measured_speed_is_the_speed_of_a_step(tmp_path):
    """seconds_per_step times steps of throwaway networks: about what the run's own steps take
    (within a factor of 3, for a busy machine), and the run's networks stay untouched."""
    cfg = tiny(tmp_path)
    shapes = data.make_shapes(64, seed=0, size=32)
    trainer = dino.Trainer(cfg, shapes, None, quiet=True)
    before = [p.clone() for p in trainer.student.parameters()]
    measured = trainer.seconds_per_step()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.student.parameters()))
    views = next(dino.train_batches(shapes, cfg, 0, trainer.device))[0]
    trainer.step(views, 0)  # warm
    t0 = time.time()
    for i in range(1, 6):
        trainer.step(views, i)[0].item()
    actual = (time.time() - t0) / 5
    assert actual / 3 < measured < actual * 3


def test_the_clock_stops_a_run_that_is_slower_than_planned(tmp_path):
    """--steps fixes T; --time_limit then only guards: the run stops inside its epoch at the limit
    and saves that position, so the same command resumes there."""
    cfg = tiny(tmp_path, steps=100_000, time_limit=0.03, epochs=1)  # 1.8 s for 100,000 steps
    shapes = data.make_shapes(64, seed=0, size=32)
    trainer = dino.Trainer(cfg, shapes, None, quiet=True)
    said = []
    trainer.fit(log=said.append)
    saved = checkpoint.load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    done = saved["epoch"] * trainer.steps_per_epoch + saved["step"]
    assert 0 < done < 100_000
    assert any("--time_limit 0.03 min reached" in line for line in said)
    assert trainer.clock.seconds() < 0.03 * 60 + 5


# -- which recipe each device gets ------------------------------------------------------------------

GPU_RECIPE = dict(patch_size=4, global_crops_size=32, local_crops_size=16, arch="vit_tiny",
                  out_dim=4096, hidden_dim=2048, bottleneck_dim=256, local_crops_number=6,
                  batch_size=512, epochs=100)


def test_a_gpu_keeps_the_gpu_recipe_and_a_cpu_gets_the_time_budget():
    gpu = dino.preset_for(32, "cifar10", gpu=True)
    assert {k: gpu[k] for k in GPU_RECIPE} == GPU_RECIPE
    assert "time_limit" not in gpu and "precision" not in gpu  # no limit, bf16 by --precision auto
    cpu = dino.preset_for(32, "cifar10", gpu=False)
    assert cpu["time_limit"] == 60 and cpu == {**cpu, **dino.CPU_RECIPE}
    assert dino.preset_for(48, "my_images", gpu=False)["time_limit"] == 60  # any small-image folder
    assert dino.preset_for(224, "imagenet", gpu=False) == {}  # photos: the paper's values
    for gpu in (False, True):  # the built-in set keeps its 4-minute preset on both
        shapes = dino.preset_for(32, "shapes", gpu=gpu)
        assert "time_limit" not in shapes and shapes["epochs"] == 4


def test_the_cpu_note_names_the_flags_of_the_full_recipe():
    """The flags the start line prints turn the CPU recipe back into the full one."""
    note = dino.cpu_recipe_note(32, "cifar10")
    flags = note.split("The full recipe: ")[1].split()
    cpu_defaults = dino.config_from_dict(dino.preset_for(32, "cifar10", gpu=False))
    parsed = vars(dino.build_parser(cpu_defaults).parse_args(flags))
    full = dino.config_from_dict({**dino.preset_for(32, "cifar10", budget=False)})
    assert dino.config_from_dict(parsed) == full


# -- the plan follows the machine (Pace) --------------------------------------------------------------

def test_warped_schedules_keep_the_past_end_at_the_last_value_and_never_jump():
    """Brute force with numpy's interp: after t_0 the old plan's remaining positions
    t_0 ... T-1 are laid over t_0 ... T'-1; the first t_0 values stay, the last is the old last,
    and no step of the new schedule changes more than the old steepest step times the
    stretch (T - 1 - t_0) / (T' - 1 - t_0)."""
    cfg = dino.Config(epochs=10, warmup_epochs=2, warmup_teacher_temp_epochs=3, freeze_last_layer=1,
                      batch_size=256, steps=200)
    old = dino.schedules(cfg, steps_per_epoch=20)
    for done, total in ((50, 330), (50, 120), (5, 60), (199, 260)):
        new = dino.warp_schedules(old, done, total)
        for name, s in old.items():
            assert len(new[name]) == total
            assert torch.equal(new[name][:done], s[:done]), name
            assert new[name][-1] == s[-1], name
        for name in ("lr", "wd", "momentum", "teacher_temp"):
            s, positions = old[name].numpy(), done + (np.arange(done, total) - done) * (199 - done) / (total - 1 - done)
            np.testing.assert_allclose(new[name][done:].numpy(), np.interp(positions, np.arange(200), s), rtol=1e-12)
            stretch = max((199 - done) / (total - 1 - done), 1.0)
            steepest = np.abs(np.diff(s)).max()
            assert np.abs(np.diff(new[name].numpy())).max() <= stretch * steepest + 1e-15, name


class FakeTime:
    """The run's clock: each step advances it by `per_step(seconds so far)`."""

    def __init__(self, per_step):
        self.t, self.per_step = 1000.0, per_step

    def __call__(self):
        return self.t

    def step(self, *_):
        self.t += self.per_step(self.t - 1000.0)


@pytest.mark.parametrize("after_half", [4.0, 1.0])
def test_a_run_whose_steps_change_speed_halfway_still_ends_in_its_budget(tmp_path, monkeypatch, after_half):
    """A 5-minute budget, 2 s/step measured at the start (so 138 steps planned, for 92 % of it);
    halfway the steps take 4 s (or 1 s). The run re-plans, ends within the budget's last 2 %
    (a step's seconds more or less), and its schedules reach their final values at its last step."""
    budget = 5 * 60
    cfg = tiny(tmp_path, time_limit=budget / 60, epochs=1000, log_every=1000)
    trainer = dino.Trainer(cfg, data.make_shapes(64, seed=0, size=32), None, quiet=True)
    fake = FakeTime(lambda seconds: 2.0 if seconds < budget / 2 else after_half)
    trainer.clock = dino.Clock(cfg.time_limit, now=fake)
    monkeypatch.setattr(trainer, "seconds_per_step", lambda: 2.0)
    trained, said = [], []
    trainer.fit(log=said.append, on_step=lambda i, *_: (trained.append(i), fake.step()))
    T = trainer.total_steps
    assert len(trainer.replans) >= 2 and trained == list(range(T)), said
    assert 0.98 * budget - after_half <= trainer.trained_seconds <= budget, (trainer.trained_seconds, said)
    assert not any("reached" in line for line in said)  # the clock never had to cut it short
    peak = cfg.lr * cfg.batch_size / 256
    last = trainer.scheduled(T - 1)
    assert last["lr"] == pytest.approx(cfg.min_lr, abs=1e-3 * peak)
    assert last["momentum"] == pytest.approx(1.0, abs=1e-4)
    assert last["teacher_temp"] == pytest.approx(cfg.teacher_temp)
    assert any(f"so T = {T} steps" in line for line in said)
    assert f"trained {T} of {T} planned steps in {trainer.trained_seconds / 60:.1f} min" in dino.time_used(trainer)


def test_a_re_planned_run_resumes_with_the_same_schedules(tmp_path, monkeypatch):
    """Stopped after a re-plan, the same command rebuilds the re-planned schedules exactly (the
    checkpoint keeps each (t_0, T')), and continues them without re-planning again."""
    cfg = tiny(tmp_path, time_limit=2.0, epochs=1000, log_every=1000)
    shapes = data.make_shapes(64, seed=0, size=32)
    trainer = dino.Trainer(cfg, shapes, None, quiet=True)
    fake = FakeTime(lambda seconds: 2.0 if seconds < 60 else 3.0)
    trainer.clock = dino.Clock(cfg.time_limit, now=fake)
    monkeypatch.setattr(trainer, "seconds_per_step", lambda: 2.0)
    trainer.fit(log=lambda *_: None, stop_after=10, on_step=lambda *_: fake.step())  # 10 epochs of 4 steps
    assert trainer.replans
    again = dino.Trainer(tiny(tmp_path, time_limit=2.0, epochs=1000, log_every=1000), shapes, None, quiet=True)
    assert again.resume(log=lambda *_: None) and again.replans == trainer.replans
    for name in trainer.schedule:
        assert torch.equal(again.schedule[name], trainer.schedule[name]), name
    assert again.pace is None  # its clock starts afresh: it follows the plan as it stands


def test_pace_keeps_the_last_steps_and_the_estimate_speaks_of_the_plan(tmp_path, monkeypatch):
    """Hand-worked: 300 s budget, 2 s/step lately. At 250 s with 30 steps left the end is projected
    at 310 s, so T' = done + (297 - 250) / 2 = done + 23; with 12 steps left the new rest would be
    fewer than 10 steps, a jump in the schedules: no re-plan (the clock guards the end). After 5
    steps, a --time_limit run's estimate names its plan, not a duration of its own."""
    pace = dino.Pace(300, 0, 0.0)
    assert pace.new_total(10, 20.0, 150, 10_000) is None  # 20 s: too short a span to tell a speed
    pace = dino.Pace(300, 95, 190.0)
    assert pace.new_total(125, 250.0, 155, 10_000) == 125 + 23 and pace.per_step == 2.0
    pace = dino.Pace(300, 100, 200.0)
    assert pace.new_total(125, 250.0, 148, 10_000) is None  # 296 s projected: in the last 2 %
    pace = dino.Pace(300, 100, 200.0)
    assert pace.new_total(125, 290.0, 137, 10_000) is None  # 3.6 s/step: 3 steps would fit
    cfg = tiny(tmp_path, time_limit=5, epochs=1000)
    trainer = dino.Trainer(cfg, data.make_shapes(64, seed=0, size=32), None, quiet=True)
    monkeypatch.setattr(trainer, "seconds_per_step", lambda: 2.0)
    dino.plan_to_time_limit(trainer)
    line = dino.progress_estimate(trainer, 2.5, 5)
    assert f"the plan: {trainer.total_steps} steps within --time_limit 5 min" in line and "remaining" not in line
