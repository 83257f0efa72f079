"""Scale and safety: torchrun with 2 processes against 1, exact resume after SIGKILL (mid-epoch
and during a save) and after Ctrl-C, a non-finite loss, unsafe checkpoints, and odd image files.

Every run goes through tests/run_dino.py, which is `python dino.py` plus hooks that pick the
moment of a kill (see its docstring)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import checkpoint
import data
import dino

ROOT = Path(__file__).resolve().parents[1]
RUN = str(ROOT / "tests" / "run_dino.py")
SMALL = ["--arch", "vit_nano", "--out_dim", "64", "--hidden_dim", "64", "--bottleneck_dim", "32",
         "--local_crops_number", "2", "--device", "cpu", "--warmup_epochs", "0",
         # the paper's head and precision, no time budget: not the CPU recipe of small images
         "--no_use_bn_in_head", "--precision", "fp32", "--time_limit", "0"]


def launch(*args, processes=1, **env):
    cmd = [sys.executable, RUN, *args]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", *cmd[1:]]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **{k: str(v) for k, v in env.items()}}
    return subprocess.run(cmd, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300)


def one_line_error(result):
    lines = [l for l in result.stderr.splitlines() if l.strip() and "%|" not in l]
    assert result.returncode != 0 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """64 training and 16 evaluation images of the built-in set, as PNG files (held in memory)."""
    root = tmp_path_factory.mktemp("pngs")
    for split, n, seed in (("train", 64, 0), ("val", 16, 1)):
        shapes = data.make_shapes(n, seed=seed)
        for i in range(n):
            d = root / split / shapes.classes[int(shapes.labels[i])]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(shapes.images[i].permute(1, 2, 0).numpy()).save(d / f"{i}.png")
    return root


def assert_equal_states(a, b):
    for key in ("student", "teacher"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    assert torch.equal(a["center"], b["center"])


def test_two_processes_train_as_one(folder, tmp_path):
    """torchrun, 2 CPU processes (gloo) with batch 8 each, against 1 process with batch 16: the
    same global batch and the same views, so the same weights up to float reordering. SGD and no
    drop-path: AdamW's first steps divide by √v ≈ |g| and magnify rounding differences (~1e-5),
    and drop-path masks are drawn per process."""
    args = [*SMALL, "--data", str(folder), "--epochs", "2", "--optimizer", "sgd", "--lr", "0.5",
            "--drop_path_rate", "0", "--save_every", "0", "--momentum_teacher", "0.9"]
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = launch(*args, "--batch_size", "16", "--output_dir", str(tmp_path / "one"),
                 DINO_TEST_DUMP=tmp_path / "one")
    assert one.returncode == 0, one.stderr
    two = launch(*args, "--batch_size", "8", "--output_dir", str(tmp_path / "two"), processes=2,
                 DINO_TEST_DUMP=tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "batch 8 x 2 processes" in two.stdout
    assert two.stdout.count("knn top1@20=") == 1  # only the first process prints
    r0, r1 = (torch.load(tmp_path / "two" / f"rank{r}.pth", weights_only=True) for r in (0, 1))
    single = torch.load(tmp_path / "one" / "rank0.pth", weights_only=True)
    # both processes hold the same teacher and center, bit for bit
    for name in r0["teacher"]:
        assert torch.equal(r0["teacher"][name], r1["teacher"][name]), name
    assert torch.equal(r0["center"], r1["center"])
    # ... and the ones of the single process, within 1e-5, after weights that moved far more
    cfg = dino.make_config({"data": str(folder), "arch": "vit_nano", "out_dim": 64, "hidden_dim": 64,
                            "bottleneck_dim": 32, "device": "cpu", "output_dir": "unused",
                            "use_bn_in_head": False}, 32, "pngs")
    torch.manual_seed(cfg.seed)
    start, _ = dino.build_networks(cfg, torch.device("cpu"))
    ck1 = torch.load(tmp_path / "one" / "checkpoint.pth", weights_only=True)
    ck2 = torch.load(tmp_path / "two" / "checkpoint.pth", weights_only=True)  # first process's
    for key in ("student", "teacher"):
        moved = max((ck1[key][n] - p).abs().max().item() for n, p in start.state_dict().items())
        assert moved > 1e-2, (key, moved)
        for name in ck1[key]:
            torch.testing.assert_close(ck2[key][name], ck1[key][name], atol=1e-5, rtol=0, msg=name)
    torch.testing.assert_close(ck2["center"], ck1["center"], atol=1e-5, rtol=0)
    assert ck2["world_size"] == 2 and torch.equal(ck2["center"], r0["center"])
    assert all(torch.equal(ck2["teacher"][n], r0["teacher"][n]) for n in r0["teacher"])
    # k-NN gathered over both processes gives the single process's accuracy
    knn = lambda out: [l for l in out.splitlines() if l.startswith("knn top1@20=")]  # noqa: E731
    assert knn(two.stdout) == knn(one.stdout)


RESUME = [*SMALL, "--epochs", "2", "--batch_size", "8", "--save_every", "3", "--drop_path_rate", "0.1"]


@pytest.fixture(scope="module")
def uninterrupted(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    result = launch(*RESUME, "--data", str(folder), "--output_dir", str(out))
    assert result.returncode == 0, result.stderr
    return torch.load(out / "checkpoint.pth", weights_only=True)


def test_interrupted_runs_resume_to_the_same_weights(folder, tmp_path, uninterrupted):
    """8 steps per epoch, a checkpoint every 3 iterations. One run is interrupted three ways in
    turn, each time started again with the same command; it ends with the weights of the
    uninterrupted run, bit for bit (drop-path on)."""
    args = [*RESUME, "--data", str(folder), "--output_dir", str(tmp_path)]
    for hook, value, code, saved_at in [
        ("DINO_TEST_KILL_AT", 5, -9, (0, 3)),        # SIGKILL mid-epoch: iterations 3, 4 are lost
        ("DINO_TEST_KILL_IN_SAVE", 2, -9, (0, 6)),   # from 3: SIGKILL inside its 2nd save (epoch end)
        ("DINO_TEST_SIGINT_AT", 10, 130, (1, 3)),    # from 6: Ctrl-C; iteration 10 finishes, saved
    ]:
        result = launch(*args, **{hook: value})
        assert result.returncode == code, (hook, result.stderr[-2000:])
        ck = torch.load(tmp_path / "checkpoint.pth", weights_only=True)  # whole, and where expected
        assert (ck["epoch"], ck["step"]) == saved_at, hook
    assert "interrupted: saved" in result.stdout
    last = launch(*args)
    assert last.returncode == 0, last.stderr[-2000:]
    assert "resumed from" in last.stdout and "epoch 1/2 + 3/8 steps" in last.stdout
    final = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert (final["epoch"], final["step"]) == (2, 0)
    assert_equal_states(final, uninterrupted)
    # the optimizer's state and the logged epoch means match too
    for a, b in zip(final["optimizer"]["state"].values(), uninterrupted["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in final["history"]] == [r["loss"] for r in uninterrupted["history"]]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(folder, tmp_path):
    result = launch(*RESUME, "--data", str(folder), "--output_dir", str(tmp_path),
                    DINO_TEST_NAN_AT=7)
    message = one_line_error(result)
    assert "iteration 7" in message and "--lr" in message and "checkpoint.pth holds the last good state (epoch 1, step 6)" in message
    ck = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert (ck["epoch"], ck["step"]) == (0, 6)  # the save at the end of epoch 1 was refused
    assert all(t.isfinite().all() for t in ck["student"].values())


def test_checkpoint_that_would_run_code_is_refused(folder, tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    torch.save({"teacher": Payload(), "student": {}}, path)
    with pytest.raises(data.DinoError, match="could run code"):
        checkpoint.load_checkpoint(path)
    assert not marker.exists()
    # through the command line: a one-line error, and nothing ran
    (tmp_path / "run").mkdir()
    os.replace(path, tmp_path / "run" / "checkpoint.pth")
    result = launch(*SMALL, "--data", str(folder), "--batch_size", "8", "--output_dir", str(tmp_path / "run"))
    assert "could run code" in one_line_error(result)
    assert not marker.exists()


def odd_folder(root: Path):
    """Nine ordinary 32 px images, one of each awkward kind, and two unreadable files."""
    g = torch.Generator().manual_seed(0)
    d = root / "train" / "things"
    d.mkdir(parents=True)
    pixels = lambda *shape: torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).numpy()  # noqa: E731
    for i in range(9):
        Image.fromarray(pixels(32, 32, 3)).save(d / f"rgb{i}.png")
    Image.fromarray(pixels(32, 32)).save(d / "gray.png")                      # L
    Image.fromarray(pixels(32, 32, 4), "RGBA").save(d / "rgba.png")           # RGBA
    Image.fromarray(pixels(32, 32, 3)).convert("P").save(d / "palette.png")   # P
    sixteen = (torch.arange(32 * 32).view(32, 32) * 64).numpy().astype("uint16")
    Image.fromarray(sixteen).save(d / "sixteen.png")                          # I;16
    Image.fromarray(pixels(8, 8, 3)).save(d / "tiny.png")                     # smaller than a crop
    (d / "zero.png").write_bytes(b"")
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    return d


def test_read_rgb_converts_every_mode(tmp_path):
    d = odd_folder(tmp_path)
    for name in ("gray", "rgba", "palette", "sixteen", "tiny"):
        image = data.read_rgb(d / f"{name}.png")
        assert image.mode == "RGB", name
    # 16-bit values v become v / 256: the pixel at index 700 holds 700·64 = 44800 → 175
    assert data.read_rgb(d / "sixteen.png").getpixel((700 % 32, 700 // 32)) == (175, 175, 175)
    assert data.read_rgb(d / "corrupt.jpg") is None and data.read_rgb(d / "zero.png") is None


def test_odd_image_folder_trains_and_names_the_bad_files(tmp_path):
    d = odd_folder(tmp_path)
    out = tmp_path / "out"
    result = launch("--data", str(tmp_path), *SMALL, "--batch_size", "5", "--epochs", "1",
                    "--global_crops_size", "32", "--local_crops_size", "16", "--patch_size", "8",
                    "--num_workers", "0", "--output_dir", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert sorted(Path(f).name for f in record["unreadable_files"]) == ["corrupt.jpg", "zero.png"]
    assert "corrupt.jpg" in result.stdout and "zero.png" in result.stdout
    # 15 files after the empty one is left out: 3 steps of 5 visit every one of them, and only
    # the two named above failed to read, so the other 14 were all trained on
    _, train, _ = data.load_data(str(tmp_path))
    assert train.images is None and len(train) == 15  # mixed sizes: cropped per image
    assert record["epoch"] == 1 and math.isfinite(record["loss"])
    # asked for strictness, the first unreadable file is a one-line error
    strict = launch("--data", str(tmp_path), *SMALL, "--batch_size", "5", "--epochs", "1",
                    "--patch_size", "8", "--global_crops_size", "32", "--local_crops_size", "16",
                    "--strict_data", "--output_dir", str(tmp_path / "strict"))
    message = one_line_error(strict)
    assert "zero.png could not be read" in message and "--strict_data" in message
