"""Hostile runs and files: figures that would be silently wrong (NaN weights, an overflowing k-NN
vote, one class), an evaluation that must not lose the epoch, the files a run writes (one run per
folder, things in the way of a save, a cut-off steps.jsonl, device nodes and FIFOs), and messages
that must be true (a NaN checkpoint, a signal before the first step, the CPU recipe note, heads).
Each ends in one `error: ` line or a named warning, never a traceback, and writes only under
tmp_path. Runs are tiny (16 images of 32 px, 2 steps an epoch) and in-process where they can be."""

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import checkpoint
import data
import dino
import hubconf
import knn_eval
import visualize
from data import DinoError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--arch", "vit_nano", "--patch_size", "8", "--out_dim", "64", "--hidden_dim", "64",
        "--bottleneck_dim", "32", "--batch_size", "8", "--local_crops_number", "2", "--device", "cpu",
        "--num_workers", "0", "--epochs", "1", "--precision", "fp32"]


def write_folder(root, classes):
    for split, n in (("train", 8), ("val", 2)):
        for c, name in enumerate(classes):
            for i in range(n):
                path = root / split / name / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (32, 32), (30 * i, 200 * c, 90)).save(path)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """16 training and 4 evaluation images in 2 classes: 2 steps of 8 an epoch."""
    return write_folder(tmp_path_factory.mktemp("two"), ["a", "b"])


def run_args(folder, out, *more):
    return ["--data", str(folder), *TINY, "--time_limit", "0", "--output_dir", str(out), *more]


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    """The folder of a finished one-epoch run (checkpoint.pth, steps.jsonl, log.jsonl)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert dino.main(run_args(folder, out)) == 0
    return out


@pytest.fixture(scope="module")
def nan_checkpoint(trained, tmp_path_factory):
    """The trained checkpoint with every weight NaN, written (valid checksum) by save_checkpoint."""
    ck = checkpoint.load_checkpoint(trained / "checkpoint.pth")
    for role in ("student", "teacher"):
        ck[role] = {k: v.float().fill_(float("nan")) if v.is_floating_point() else v for k, v in ck[role].items()}
    path = tmp_path_factory.mktemp("nan") / "checkpoint.pth"
    checkpoint.save_checkpoint(ck, path)
    return path


def one_error_line(result):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stdout + result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def script(*args, env=None, cwd=None, **kwargs):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=30,
                          cwd=cwd, env={**os.environ, **(env or {})}, **kwargs)


# -- 1a. non-finite weights and features -------------------------------------------------------

NAN_READERS = {  # every way weights come in: each must refuse, and write nothing
    "knn_eval": lambda ck, folder, out: knn_eval.main(["--checkpoint", ck, "--data", folder, "--device", "cpu"]),
    "export": lambda ck, folder, out: knn_eval.main(["--export", f"{out}/backbone.pth", "--checkpoint", ck]),
    "embed": lambda ck, folder, out: knn_eval.main(["--embed", folder, "--checkpoint", ck, "--out", f"{out}/e.pth"]),
    "attention": lambda ck, folder, out: visualize.main(["attention", "--checkpoint", ck, "--out", str(out)]),
    "hub": lambda ck, folder, out: hubconf.from_file(ck),
    "init_from": lambda ck, folder, out: dino.main(run_args(folder, out / "run", "--init_from", ck)),
}


@pytest.mark.parametrize("reader", NAN_READERS)
def test_nan_weights_are_refused_by_every_reader(reader, nan_checkpoint, folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DinoError, match="(weights hold|holds) NaN or infinite"):  # the loader's own check
        NAN_READERS[reader](str(nan_checkpoint), str(folder), out)
    assert [p.name for p in out.rglob("*") if p.is_file()] == []


def test_nan_weights_give_one_line_not_a_knn_figure(nan_checkpoint, folder, tmp_path):
    result = script(ROOT / "knn_eval.py", "--checkpoint", nan_checkpoint, "--data", folder,
                    "--device", "cpu", cwd=tmp_path)
    assert "the teacher backbone's weights hold NaN" in one_error_line(result)
    assert "top1" not in result.stdout


class Overflowing(torch.nn.Module):
    """Finite weights whose features are not: a row of ±inf (overflow) in every batch."""

    def forward(self, x):
        f = torch.ones(len(x), 4)
        f[0] = float("inf")
        return f

    def get_intermediate_layers(self, x, n):
        return [self(x)[:, None, :]] * n


def nan_features_file(tmp_path):
    f = F.normalize(torch.randn(6, 4), dim=1)
    f[2, 1] = float("nan")
    path = tmp_path / "features.pth"
    checkpoint.save_checkpoint(dict(train_features=f, train_labels=torch.arange(6) % 2,
                                    test_features=f, test_labels=torch.arange(6) % 2, classes=["a", "b"]), path)
    return path


FEATURE_CASES = {
    "knn features": lambda tmp: knn_eval.extract_features(Overflowing(), [(torch.zeros(3, 3, 8, 8), [0, 1, 0])], "cpu"),
    "probe features": lambda tmp: knn_eval.extract_probe_features(Overflowing(), [(torch.zeros(3, 3, 8, 8), [0, 1, 0])], "cpu"),
    "saved features": lambda tmp: knn_eval.main(["--load_features", str(nan_features_file(tmp))]),
}


@pytest.mark.parametrize("case", FEATURE_CASES)
def test_non_finite_features_are_refused(case, tmp_path):
    with pytest.raises(DinoError, match="NaN or infinite values"):
        FEATURE_CASES[case](tmp_path)


# -- 1b, 1c. the k-NN vote at a small temperature; one class -----------------------------------

def float64_brute_force_top1(train, train_y, test, test_y, k, T, num_classes):
    """The weighted k-NN top-1 with every similarity and weight in float64 (exp(1 / 0.01) = e^100
    fits); ties between classes go to the lower index."""
    s = test.double() @ train.double().T
    values, idx = s.topk(k, dim=1)
    scores = torch.zeros(len(test), num_classes, dtype=torch.float64)
    scores.scatter_add_(1, train_y[idx], torch.exp(values / T))
    assert torch.isfinite(scores).all()
    return 100 * (scores.argmax(dim=1) == test_y).double().mean().item()


def test_a_small_temperature_votes_as_float64_does():
    """At T = 0.01 exp(s / T) overflows float32 for s > 0.89: with neighbours that close, the
    votes were inf, ties went to class 0, and the top-1 fell to chance."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(16, generator=g)  # 4 classes whose centres lie close together
    centres = F.normalize(base + 0.05 * base.norm() / 4 * torch.randn(4, 16, generator=g), dim=1)

    def cluster(n):
        y = torch.randint(4, (n,), generator=g)
        return F.normalize(centres[y] + 0.1 / 4 * torch.randn(n, 16, generator=g), dim=1), y

    (train, train_y), (test, test_y) = cluster(400), cluster(200)  # float32 features
    assert (test @ train.T).topk(20).values.min() > 0.9  # every vote exp(s / 0.01) > e^90: inf in float32
    expected = float64_brute_force_top1(train, train_y, test, test_y, 20, 0.01, 4)
    assert expected > 70  # chance: 25 %
    for chunk in (7, 1024):
        top1, _ = knn_eval.knn_accuracy(train, train_y, test, test_y, k=20, temperature=0.01,
                                        num_classes=4, chunk_size=chunk)
        assert top1 == pytest.approx(expected)
    # and the default T = 0.07 keeps the formula's scores
    torch.testing.assert_close(
        knn_eval.knn_scores(train.double(), train_y, test[:5].double(), k=20, temperature=0.07, num_classes=4)[:, 0],
        torch.stack([torch.exp(v / 0.07)[train_y[i] == 0].sum() for v, i in
                     zip(*(test[:5].double() @ train.double().T).topk(20))]))


@pytest.fixture(scope="module")
def one_class(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("one"), ["only"])


def test_one_class_says_the_knn_means_nothing(one_class, capsys):
    assert knn_eval.main(["--raw_pixels", "--data", str(one_class), "--device", "cpu"]) == 0
    said = capsys.readouterr().out
    assert "warning: the training labels hold one class (only)" in said and "knn top1@" in said
    _, train, evaluation = data.load_data(str(one_class))
    lines = []
    dino.start_notes(dino.Config(data=str(one_class)), train, evaluation, lines.append)
    assert any(line.startswith("warning: the training labels hold one class") for line in lines)
    _, train, evaluation = data.load_data(str(write_folder(one_class.parent / "two_again", ["a", "b"])))
    lines = []
    dino.start_notes(dino.Config(), train, evaluation, lines.append)
    assert not any("one class" in line for line in lines)


# -- 2. save before the end-of-epoch evaluation --------------------------------------------------

def test_the_checkpoint_history_holds_the_knn(trained):
    ck = checkpoint.load_checkpoint(trained / "checkpoint.pth")
    assert ck["epoch"] == 1 and "knn_top1" in ck["history"][-1]
    logged = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    assert logged[-1]["knn_top1"] == ck["history"][-1]["knn_top1"]


def test_a_failing_evaluation_loses_no_epoch(folder, tmp_path, monkeypatch):
    def broken(self, *args, **kwargs):
        raise DinoError("the k-NN broke")

    monkeypatch.setattr(dino.Trainer, "knn", broken)
    with pytest.raises(DinoError, match="the k-NN broke"):
        dino.main(run_args(folder, tmp_path / "run"))
    ck = checkpoint.load_checkpoint(tmp_path / "run" / "checkpoint.pth")
    assert ck["epoch"] == 1 and ck["step"] == 0 and "knn_top1" not in ck["history"][-1]
    assert json.loads((tmp_path / "run" / "log.jsonl").read_text())["epoch"] == 1  # recorded all the same
    assert not (tmp_path / "run" / ".lock").exists()


# -- 3a. one run per output folder ----------------------------------------------------------------

# another run holding the folder, as RunLock holds it (flock, "pid host"), without torch's start-up
HOLD = ("import fcntl, os, socket, sys; f = open(os.path.join(sys.argv[1], '.lock'), 'a+'); "
        "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB); f.write(f'{os.getpid()} {socket.gethostname()}\\n'); "
        "f.flush(); print('held', flush=True); sys.stdin.read()")


def test_a_second_run_into_the_same_folder_is_refused_until_the_first_is_gone(folder, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = script(ROOT / "dino.py", *run_args(folder, out), cwd=tmp_path)
        line = one_error_line(second)
        assert f"in use by another run (pid {holder.pid} on " in line and "checkpoint" not in second.stdout
        assert not (out / "checkpoint.pth").exists()
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, its flock gone with the process
        holder.wait(timeout=30)
    assert (out / ".lock").read_text().split()[0] == str(holder.pid)
    assert dino.main(run_args(folder, out)) == 0  # a stale lock is taken over
    assert f"warning: took over {out / '.lock'} from {holder.pid} on " in capsys.readouterr().out
    assert not (out / ".lock").exists() and (out / "checkpoint.pth").exists()


def test_a_lock_held_in_this_process_names_it(folder, tmp_path):
    with dino.RunLock(tmp_path):
        assert (tmp_path / ".lock").read_text().split()[0] == str(os.getpid())
        with pytest.raises(DinoError, match=f"pid {os.getpid()} on "):
            dino.main(run_args(folder, tmp_path))
    assert not (tmp_path / ".lock").exists()


def test_sigterm_while_timing_the_steps_stops_truly_and_frees_the_folder(folder, tmp_path):
    """--time_limit times steps before step 0: SIGTERM there is handled (exit 130 and a message,
    not 143 in silence), and the message says that no checkpoint exists."""
    out = tmp_path / "run"
    result = script(ROOT / "tests" / "run_dino.py", *run_args(folder, out, "--time_limit", "5"),
                    env={"DINO_TEST_SIGNAL_IN_STEP": "TERM:2"}, cwd=tmp_path)
    assert result.returncode == 130, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "stopped before any checkpoint was written" in result.stdout
    assert not (out / "checkpoint.pth").exists() and not (out / ".lock").exists()


def test_ctrl_c_while_timing_the_steps_does_not_promise_a_resume(folder, tmp_path, capsys, monkeypatch):
    calls, original = [], dino.train_step

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(dino, "train_step", interrupted)
    out = tmp_path / "run"
    assert dino.main(run_args(folder, out, "--time_limit", "5")) == 130
    said = capsys.readouterr().out
    assert len(calls) == 2  # stopped at the next step of the measurement
    assert "stopped before any checkpoint was written" in said and "run the same command to resume" not in said
    assert not (out / "checkpoint.pth").exists() and not (out / ".lock").exists()


# -- 3b, 3d. what may stand where a file is written ----------------------------------------------

def special(tmp_path, kind):
    path = tmp_path / "target.pth"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "link to a device":
        os.symlink("/dev/null", path)
    elif kind == "folder":
        path.mkdir()
    return path


@pytest.mark.parametrize("kind,message", [("fifo", "a FIFO"), ("link to a device", "a character device"),
                                          ("folder", "a folder")])
def test_save_checkpoint_replaces_only_a_regular_file(kind, message, tmp_path):
    path = special(tmp_path, kind)
    before = os.lstat(path)
    with pytest.raises(DinoError, match=f"could not write .*target.pth: it is {message}"):
        checkpoint.save_checkpoint({"w": torch.ones(2)}, path)
    after = os.lstat(path)
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)
    assert not (tmp_path / "target.pth.tmp").exists()


@pytest.mark.parametrize("flag", ["--save_features", "--out", "--export"])
@pytest.mark.parametrize("kind", ["fifo", "link to a device"])
def test_output_flags_refuse_a_special_file_before_any_work(flag, kind, trained, tmp_path):
    path = special(tmp_path, kind)
    args = {"--save_features": ["--raw_pixels", "--save_features", path],
            "--out": ["--embed", "x", "--checkpoint", trained / "checkpoint.pth", "--out", path],
            "--export": ["--export", path, "--checkpoint", trained / "checkpoint.pth"]}[flag]
    with pytest.raises(DinoError, match=f"{flag} .*target.pth is a device, FIFO or other special file"):
        knn_eval.main(list(map(str, args)))
    assert os.path.islink(path) if kind != "fifo" else Path(path).is_fifo()


def test_a_folder_at_the_temporary_name_is_one_line_and_a_symlink_there_is_not_followed(folder, tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint.pth.tmp").mkdir(parents=True)
    with pytest.raises(DinoError, match="checkpoint.pth.tmp, its temporary name, is a folder"):
        dino.main(run_args(folder, out))
    assert (out / "checkpoint.pth.tmp").is_dir() and not (out / ".lock").exists()
    assert not (out / "steps.jsonl").exists()  # found before training, not at the first save
    with pytest.raises(DinoError, match="checkpoint.pth.tmp, its temporary name, is a folder"):
        checkpoint.save_checkpoint({"w": torch.ones(2)}, out / "checkpoint.pth")  # and at a save
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    path = tmp_path / "ck.pth"
    os.symlink(victim, tmp_path / "ck.pth.tmp")  # as a hostile user could plant it
    checkpoint.save_checkpoint({"w": torch.ones(2)}, path)
    assert victim.read_text() == "keep me" and path.is_file() and not path.is_symlink()
    assert torch.equal(checkpoint.load_checkpoint(path)["w"], torch.ones(2))


# -- 3c. a steps.jsonl cut short --------------------------------------------------------------

BROKEN_LAST_LINES = ['{"iteration": 1, "lo', '{"iteration": 1, "lo}', '\x00\x00\x00}', '[1]}',
                     '{"loss": 1.0}', '{"iteration": "1"}']


@pytest.mark.parametrize("last", BROKEN_LAST_LINES)
def test_a_broken_last_line_of_the_records_is_dropped(last, tmp_path):
    good = [json.dumps({"iteration": i, "epoch": i / 2, "loss": 1.0}) for i in range(4)]
    for name in ("steps.jsonl", "log.jsonl"):
        (tmp_path / name).write_text("\n".join(good) + "\n" + last)
    dino.RunLog(dino.Config(output_dir=str(tmp_path))).open(start_iteration=3)
    assert (tmp_path / "steps.jsonl").read_text() == "\n".join(good[:3]) + "\n"
    try:
        json.loads(last)
    except ValueError:  # log.jsonl: a line cut short (the epoch being written) is left out
        assert len(visualize.read_log(tmp_path)) == 4


def test_a_run_resumes_over_a_steps_file_cut_mid_line(trained, folder, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    with open(out / "steps.jsonl", "a") as f:
        f.write('{"iteration": 9, "loss": 1.\x00\x00}')  # a crash mid-write, zeros where bytes were
    assert dino.main(run_args(folder, out, "--epochs", "2")) == 0
    steps = [json.loads(line)["iteration"] for line in (out / "steps.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]


# -- 4. messages that must be true ------------------------------------------------------------------

def test_a_nan_checkpoint_is_not_called_the_last_good_state(nan_checkpoint, folder, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(nan_checkpoint, out / "checkpoint.pth")
    with pytest.raises(DinoError) as e:
        dino.main(run_args(folder, out, "--epochs", "2"))
    assert "holds NaN or infinite values" in str(e.value) and "delete it" in str(e.value)
    assert "last good state" not in str(e.value)


def test_the_cpu_note_describes_the_run_it_starts(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(dino.Trainer, "seconds_per_step", lambda self: 1.0)
    args = ["--data", str(folder), "--arch", "vit_tiny", "--batch_size", "8", "--device", "cpu",
            "--time_limit", "0.001", "--output_dir", str(tmp_path / "run")]
    with pytest.raises(DinoError, match="--time_limit 0.001 min is shorter than one step"):
        dino.main(args)
    said = capsys.readouterr().out
    assert "on a CPU: a recipe for --time_limit 0.001 min under your flags (vit_tiny/4, 6 local views, batch 8, bf16)" in said
    assert "batch 64" not in said
    assert "under your flags" not in dino.cpu_recipe_note(32, "cifar10", 60, dino.make_config({}, 32, "cifar10"))


@pytest.fixture(scope="module")
def exported(trained):
    path = trained.parent / "backbone.pth"
    assert knn_eval.main(["--export", str(path), "--checkpoint", str(trained / "checkpoint.pth")], log=lambda *_: None) == 0
    return path


HEADS = [  # (file, num_heads, what happens): vit_nano has 4 heads; its checkpoint records them
    ("checkpoint", 8, "error"), ("checkpoint", 4, 4), ("checkpoint", None, 4),
    ("export", 8, "warning"), ("export", 4, 4), ("export", None, 4),
]


@pytest.mark.parametrize("kind,num_heads,expected", HEADS)
def test_from_file_with_other_heads(kind, num_heads, expected, trained, exported):
    path = trained / "checkpoint.pth" if kind == "checkpoint" else exported
    if expected == "error":
        with pytest.raises(DinoError, match="was trained with 4 attention heads .*not 8"):
            hubconf.from_file(str(path), num_heads=num_heads)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = hubconf.from_file(str(path), num_heads=num_heads)
    said = [str(w.message) for w in caught]
    if expected == "warning":
        assert any("8 heads asked for a ViT of width 64, which has 4" in m for m in said), said
        assert model.blocks[0].attn.num_heads == 8
    else:
        assert not any("heads" in m for m in said) and model.blocks[0].attn.num_heads == expected
