"""Runs one can inspect: config.json (the effective values), steps.jsonl (a record every N steps,
N chosen so the default run has at least 100), the curves drawn from them, TensorBoard."""

import dataclasses
import importlib.util
import json
import math

import pytest
import torch

import data
import dino
import visualize


def tiny(tmp_path, **changes):
    explicit = dict(arch="vit_nano", patch_size=8, global_crops_size=16, local_crops_size=8,
                    local_crops_number=2, out_dim=32, hidden_dim=24, bottleneck_dim=12,
                    batch_size=16, epochs=2, warmup_epochs=1, device="cpu", output_dir=str(tmp_path / "run"))
    return dino.make_config({**explicit, **changes}, 32, "shapes")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_default_run_has_at_least_100_step_records():
    """Acceptance 4, by arithmetic: `python dino.py` trains 4 epochs of 10,000 / 32 = 312 steps,
    T = 1248; the cadence ⌊T / 100⌋ = 12 records iterations 0, 12, ..., 1236: 104 records. The
    Trainer is built on 10,000 blank images (the built-in set's size) with the default Config."""
    cfg = dino.parse_config(["--device", "cpu"])
    blank = data.ImageSet(labels=torch.zeros(10_000, dtype=torch.long), classes=["a"],
                          images=torch.zeros(10_000, 3, 1, 1, dtype=torch.uint8))
    trainer = dino.Trainer(cfg, blank, None, quiet=True)
    total = cfg.epochs * trainer.steps_per_epoch
    assert (cfg.epochs, trainer.steps_per_epoch, trainer.record_every) == (4, 312, 12)
    assert len(range(0, total, trainer.record_every)) == 104
    # the rule for any length: at least 100 records, or every step of a shorter run
    for T in range(1, 5000):
        assert math.ceil(T / dino.record_every(T)) >= min(T, 100), T
    assert dino.record_every(1248, log_every=5) == 5


def test_a_short_run_writes_its_config_and_step_records_and_resumes_them(tmp_path):
    """Two epochs of 4 steps, a record every step (T = 8 < 100): each record holds the step's
    loss and diagnostics as on_step saw them and the schedules' values at its iteration; the
    epoch means of log.jsonl are the means of its records; config.json is the run's Config."""
    cfg = tiny(tmp_path)
    train = data.make_shapes(64, seed=0)
    trainer = dino.Trainer(cfg, train, None, quiet=True)
    seen = {}
    trainer.fit(log=lambda *_: None, on_step=lambda it, loss, stats: seen.setdefault(
        it, (loss.item(), stats["teacher_entropy"].item(), stats["kl"].item())))
    run = tmp_path / "run"
    assert dino.config_from_dict(json.loads((run / "config.json").read_text())) == cfg
    steps = read_jsonl(run / "steps.jsonl")
    assert [s["iteration"] for s in steps] == list(range(8))
    for s in steps:
        it = s["iteration"]
        assert (s["loss"], s["teacher_entropy"], s["kl"]) == seen[it]
        assert s["epoch"] == (it + 1) / 4 and s["lr"] == float(trainer.schedule["lr"][it])
        assert s["momentum"] == float(trainer.schedule["momentum"][it])
        assert s["teacher_temp"] == float(trainer.schedule["teacher_temp"][it // 4])
        assert s["log_K"] == math.log(32) and s["center_norm"] > 0
    epochs = read_jsonl(run / "log.jsonl")
    for e in epochs:
        mean = sum(s["loss"] for s in steps if math.ceil(s["epoch"]) == e["epoch"]) / 4
        assert e["loss"] == pytest.approx(mean, rel=1e-6)
    assert epochs[-1]["center_norm"] == pytest.approx(steps[-1]["center_norm"], rel=1e-6)

    # resuming: records past the checkpoint (as a killed run leaves them) are dropped, the run's
    # own come again, now every 3 steps (iterations 8 to 11: 9 only)
    with open(run / "steps.jsonl", "a") as f:
        f.write(json.dumps({**steps[-1], "iteration": 8, "loss": -1.0}) + "\n")
        f.write('{"iteration": 9, "epoch": 2.5, "lo')  # killed while writing
    more = dataclasses.replace(cfg, epochs=3, log_every=3)
    trainer = dino.Trainer(more, train, None, quiet=True)
    assert trainer.resume(log=lambda *_: None)
    trainer.fit(log=lambda *_: None)
    assert [s["iteration"] for s in read_jsonl(run / "steps.jsonl")] == list(range(8)) + [9]
    assert dino.config_from_dict(json.loads((run / "config.json").read_text())) == more

    # the curves: the step records as lines, the epoch means as dots
    records, steps = visualize.read_run(run)
    fig = visualize.curves_figure(records, steps=steps)
    loss_axis = next(ax for ax in fig.axes if ax.get_title().startswith("DINO loss"))
    line, dots = loss_axis.get_lines()[:2]
    assert list(line.get_xdata()) == [s["epoch"] for s in steps]
    assert list(line.get_ydata()) == [s["loss"] for s in steps]
    assert list(dots.get_ydata()) == [r["loss"] for r in records]
    assert visualize.main(["curves", "--run", str(run)]) == 0 and (run / "curves.png").is_file()

    # during the first epoch: no log.jsonl yet, and the record being written is left out
    live = tmp_path / "live"
    live.mkdir()
    (live / "steps.jsonl").write_text((run / "steps.jsonl").read_text() + '{"iteration": 12, "lo')
    records, steps = visualize.read_run(live)
    assert records == [] and [s["iteration"] for s in steps] == list(range(8)) + [9]
    assert "0 epochs" in visualize.curves_figure(records, steps=steps)._suptitle.get_text()


def test_step_records_read_the_device_only_on_their_cadence(tmp_path, monkeypatch):
    """Between one step's on_step and the next, record_step's single read (Tensor.tolist) happens
    only after iterations 0, 3, 6 of a run recorded every 3 steps; none on the other steps."""
    cfg = tiny(tmp_path, epochs=1, log_every=3, batch_size=8)
    trainer = dino.Trainer(cfg, data.make_shapes(64, seed=0), None, quiet=True)
    reads, marks = [0], []
    original = torch.Tensor.tolist

    def counted(t, *args, **kwargs):
        reads[0] += 1
        return original(t, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    trainer.fit(log=lambda *_: None, on_step=lambda it, loss, stats: marks.append(reads[0]))
    between = [b - a for a, b in zip(marks, marks[1:])]  # reads after iteration i, before i + 1
    assert between == [1, 0, 0, 1, 0, 0, 1]


def test_tensorboard_without_the_package_is_a_one_line_error(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(data.DinoError, match="^--tensorboard needs the tensorboard package, which is not "
                                             "installed: pip install tensorboard$"):
        tiny(tmp_path, tensorboard=True)


def test_tensorboard_gets_the_step_records(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    cfg = tiny(tmp_path, epochs=1, tensorboard=True)
    dino.Trainer(cfg, data.make_shapes(64, seed=0), None, quiet=True).fit(log=lambda *_: None)
    steps = read_jsonl(tmp_path / "run" / "steps.jsonl")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {f"train/{k}" for k in dino.STEP_SCALARS}
    for key in dino.STEP_SCALARS:
        logged = events.Scalars(f"train/{key}")
        assert [e.step for e in logged] == [s["iteration"] for s in steps]
        assert [e.value for e in logged] == pytest.approx([s[key] for s in steps], rel=1e-6)
