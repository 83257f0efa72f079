"""Hostile and broken input through the real command lines: each case ends in one line on stderr
that names the problem (or a documented warning), never a traceback, and touches no file outside
its output folder. A hostile data file never runs its code; a failed save loses nothing."""

import errno
import os
import pickle
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import data
import dino
import knn_eval

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"dino": ROOT / "dino.py", "knn_eval": ROOT / "knn_eval.py", "visualize": ROOT / "visualize.py"}
TINY = ["--arch", "vit_nano", "--out_dim", "16", "--hidden_dim", "16", "--bottleneck_dim", "8",
        "--batch_size", "4", "--epochs", "1", "--device", "cpu", "--num_workers", "0",
        "--local_crops_number", "0"]


class RunsCode:
    """Unpickling this touches a marker file: a stand-in for a shell command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_png(path, size=32, color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A sandbox of broken things; each case may only write inside its own output folder."""
    root = tmp_path_factory.mktemp("hostile")
    # CIFAR-10 whose metadata runs a command when unpickled
    evil = root / "evil_cifar" / "cifar-10-batches-py"
    evil.mkdir(parents=True)
    (evil / "batches.meta").write_bytes(pickle.dumps({"label_names": RunsCode(root / "pwned")}))
    # CIFAR-10 missing a batch, and one with a truncated batch
    good_batch = pickle.dumps({"data": np.zeros((4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]})
    for name, drop, cut in (("missing_cifar", "data_batch_1", None), ("truncated_cifar", None, "data_batch_3")):
        base = root / name / "cifar-10-batches-py"
        base.mkdir(parents=True)
        (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
        for b in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            if b != drop:
                (base / b).write_bytes(good_batch[:30] if b == cut else good_batch)
    # an image folder with a decompression bomb, a dangling symlink and a symlink loop
    folder = root / "folder"
    for split in ("train", "val"):
        for c in ("a", "b"):
            for i in range(4):
                write_png(folder / split / c / f"{i}.png", color=(40 * i, 100 if c == "a" else 10, 50))
    write_bomb(folder / "train" / "a" / "bomb.png")
    os.symlink(root / "nowhere.png", folder / "train" / "a" / "dangling.png")
    os.symlink(folder / "train" / "b" / "loop.png", folder / "train" / "b" / "loop.png")
    # a class whose images sit one level down
    nested = root / "nested"
    for c in ("a", "b"):
        write_png(nested / "train" / c / "0.png")
    write_png(nested / "train" / "c" / "deeper" / "0.png")
    (root / "a_file").write_text("not a folder")
    torch.save({"state_dict": vit_state()}, root / "nested_weights.pth")
    return root


def write_bomb(path):
    """A valid PNG whose header claims 30000 x 30000 px: PIL refuses it as a decompression bomb
    (DecompressionBombError, which is not an OSError)."""
    Image.new("L", (1, 1)).save(path)
    raw = bytearray(path.read_bytes())
    raw[16:24] = (30000).to_bytes(4, "big") * 2  # width, height in the IHDR chunk
    raw[29:33] = zlib.crc32(bytes(raw[12:29])).to_bytes(4, "big")  # the chunk's CRC over type + data
    path.write_bytes(bytes(raw))
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)


def vit_state():
    import vit
    return vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4).state_dict()


def run(script, *args, cwd):
    return subprocess.run([sys.executable, str(SCRIPTS[script]), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def snapshot(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if not p.is_symlink()}


CASES = [  # (script, args, what the one line must say); {w} is the sandbox, {out} the output folder
    ("dino", ["--data", "{w}/evil_cifar"], "batches.meta is not a readable CIFAR-10 file"),
    ("knn_eval", ["--raw_pixels", "--data", "{w}/evil_cifar"], "batches.meta is not a readable CIFAR-10 file"),
    ("dino", ["--data", "{w}/missing_cifar"], "data_batch_1 is missing"),
    ("dino", ["--data", "{w}/truncated_cifar"], "data_batch_3 is not a readable CIFAR-10 file"),
    ("dino", ["--data", "{w}/nested"], "class folder"),
    ("dino", ["--clip_grad", "-1"], "--clip_grad must be at least 0"),
    ("dino", ["--min_lr", "-1"], "--min_lr must be at least 0"),
    ("dino", ["--hidden_dim", "0"], "--hidden_dim must be at least 1"),
    ("dino", ["--time_limit", "-1"], "--time_limit must be at least 0"),
    ("dino", ["--drop_path_rate", "1.5"], "--drop_path_rate must be at least 0 and below 1"),
    ("dino", ["--device", "tpu"], "--device tpu is unknown"),
    ("knn_eval", ["--raw_pixels", "--device", "tpu"], "--device tpu is unknown"),
    ("knn_eval", ["--pretrained", "{w}/nested_weights.pth"], "under the key 'state_dict'"),
    ("dino", ["--output_dir", "{w}/a_file"], "--output_dir {w}/a_file"),
    ("dino", ["--output_dir", "{w}/a_file/below"], "--output_dir {w}/a_file/below"),
    ("knn_eval", ["--raw_pixels", "--save_features", "{w}/a_file/f.pth"], "--save_features {w}/a_file/f.pth"),
    ("visualize", ["views", "--out", "{w}/a_file"], "--out {w}/a_file"),
    ("visualize", ["views", "--image", "{w}/folder/train/a/bomb.png"], "bomb.png could not be read"),
]


@pytest.mark.parametrize("script,args,message", CASES, ids=[f"{c[0]} {' '.join(c[1])}" for c in CASES])
def test_bad_input_is_one_line_and_touches_nothing_else(world, tmp_path, script, args, message):
    before = snapshot(world)
    args = [a.format(w=world, out=tmp_path / "out") for a in args]
    if script == "dino" and "--output_dir" not in args:
        args += ["--output_dir", str(tmp_path / "out")]
    result = run(script, *(TINY if script == "dino" else []), *args, cwd=tmp_path)  # the case's flags win
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message.format(w=world) in lines[0], lines[0]
    assert not (world / "pwned").exists()  # the hostile pickle ran nothing
    assert snapshot(world) == before  # nothing in the sandbox was written
    assert {p.name for p in tmp_path.iterdir()} <= {"out"}


def test_broken_files_among_the_images_are_skipped_and_named(world, tmp_path):
    """A decompression bomb, a dangling symlink and a symlink loop: skipped, named, training goes on."""
    result = run("dino", "--data", world / "folder", "--output_dir", tmp_path / "out", *TINY, cwd=tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    for name in ("bomb.png", "dangling.png", "loop.png"):
        assert name in result.stdout, result.stdout


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    """16 training and 4 evaluation images of 32 px in 2 classes: 4 steps of 4 images an epoch."""
    root = tmp_path_factory.mktemp("small")
    for split, n in (("train", 8), ("val", 2)):
        for c in ("a", "b"):
            for i in range(n):
                write_png(root / split / c / f"{i}.png", color=(30 * i, 200 if c == "a" else 0, 9))
    return root


def test_warnings_for_a_run_that_never_leaves_warm_up_and_for_changed_settings(tmp_path, capsys, small_folder):
    out = str(tmp_path / "out")
    args = ["--data", str(small_folder), *TINY, "--output_dir", out, "--warmup_epochs", "3",
            "--freeze_last_layer", "2"]
    assert dino.main(args + ["--seed", "0"]) == 0
    said = capsys.readouterr().out
    assert "--warmup_epochs 3 covers the whole run of 1 epoch(s)" in said
    assert "--freeze_last_layer 2 covers the whole run" in said
    assert dino.main(args + ["--seed", "1", "--epochs", "2", "--lr", "0.001"]) == 0
    said = capsys.readouterr().out
    lr = dino.CPU_RECIPE["lr"]  # small images on a CPU: the one-hour recipe
    assert f"warning: resumed with changed settings: lr {lr} → 0.001; seed 0 → 1" in said, said
    assert "a new --output_dir starts afresh" in said  # how not to resume, where the warning is
    assert "epochs" not in said.split("changed settings")[1].split("\n")[0]  # raising --epochs is how a run goes on


def test_knn_with_more_neighbours_than_images_says_so(capsys, small_folder):
    knn_eval.main(["--raw_pixels", "--data", str(small_folder), "--k", "1000", "--device", "cpu"])
    said = capsys.readouterr().out
    assert "k = 16 (the training split has 16 images, fewer than --k 1000)" in said
    assert "knn top1@16=" in said and "top1@1000" not in said


# -- nothing lost when the output cannot be written ---------------------------------------------

def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_during_a_save_keeps_the_old_checkpoint_and_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    checkpoint.save_checkpoint({"w": torch.ones(3)}, path)

    def write_half(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise RuntimeError("unexpected pos 123 vs 456")  # what torch.save says when the disk fills

    monkeypatch.setattr(torch, "save", write_half)
    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(data.DinoError, match="could not write .*checkpoint.pth"):
        checkpoint.save_checkpoint({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert not (tmp_path / "checkpoint.pth.tmp").exists()
    assert torch.equal(checkpoint.load_checkpoint(path)["w"], torch.ones(3))


def test_a_failed_save_inside_an_epoch_is_reported_and_training_goes_on(tmp_path, monkeypatch, capsys,
                                                                        small_folder):
    saves = []

    def failing_save(state, path):
        saves.append(state["step"])
        if state["step"]:  # the mid-epoch saves fail, the epoch-end one works
            raise data.DinoError(f"could not write {path}: No space left on device")
        original(state, path)

    original = checkpoint.save_checkpoint
    monkeypatch.setattr(checkpoint, "save_checkpoint", failing_save)
    args = ["--data", str(small_folder), "--output_dir", str(tmp_path / "out"), *TINY, "--save_every", "1"]
    assert dino.main(args) == 0
    said = capsys.readouterr().out
    assert "could not write" in said and "No space left on device" in said and "training goes on" in said
    assert saves[-1] == 0 and any(saves[:-1])
    assert (tmp_path / "out" / "checkpoint.pth").exists()


def test_a_read_only_output_folder_fails_before_any_work(tmp_path):
    out = tmp_path / "readonly"
    out.mkdir()
    out.chmod(0o500)
    try:
        if os.access(out, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root): chmod does not bind")
        result = run("dino", "--output_dir", out, *TINY, cwd=tmp_path)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert f"--output_dir {out} cannot be written" in result.stderr
        assert "DINO on" not in result.stdout  # refused before data and model were built
    finally:
        out.chmod(0o700)


def test_a_read_only_file_system_fails_before_any_work(tmp_path, monkeypatch):
    """What a read-only mount answers (root ignores chmod, so the answer is faked where the
    probe file is written); the run must stop before reading data or building the model."""
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    def no_data(*args, **kwargs):
        raise AssertionError("data was read before the output folder was checked")

    monkeypatch.setattr(Path, "write_bytes", read_only)
    monkeypatch.setattr(data, "load_data", no_data)
    with pytest.raises(data.DinoError, match="--output_dir .* cannot be written \\(Read-only file system\\)"):
        dino.main(["--output_dir", str(tmp_path / "out"), *TINY])


def test_an_overwritten_checkpoint_is_caught_by_its_checksum(tmp_path):
    path = tmp_path / "checkpoint.pth"
    checkpoint.save_checkpoint({"student": {"w": torch.arange(1000.0)}}, path)
    raw = bytearray(path.read_bytes())
    start = raw.find(np.arange(1000, dtype=np.float32)[500:510].tobytes())
    raw[start:start + 8] = b"\x00" * 8  # bytes of the tensor overwritten, the archive still reads
    path.write_bytes(bytes(raw))
    with pytest.raises(data.DinoError, match="checksum"):
        checkpoint.load_checkpoint(path)
