"""Hostile input that used to hang, allocate without bound or pass unchecked: files that never end
(named pipes, gigabytes of sparse zeros after an image header), sizes taken from the input
(tokens, --image_size, --samples), flags without an upper bound or that admit inf and nan,
labels and shapes that do not fit, masks of the wrong size, EXIF-rotated photos, hidden folders,
and the count of unreadable files. Each case ends in one line that names the problem, in bounded
time; only the cases that could hang run in a subprocess (with a timeout of 20 s)."""

import io
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as transforms

import checkpoint
import data
import dino
import knn_eval
import visualize
import vit

ROOT = Path(__file__).resolve().parents[1]
HANG_TIMEOUT = 20  # s: every case below ends in well under it once fixed


def write_png(path, size=(32, 32), color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def jpeg_header() -> bytes:
    """The first bytes of a real JPEG, up to (not including) its frame header: PIL takes the file
    for a JPEG and scans what follows for markers."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG")
    return buffer.getvalue()[:20]


def sparse_jpeg(path, size: int):
    """A JPEG header followed by zeros up to `size` bytes: a sparse file, no disk used."""
    with open(path, "wb") as f:
        f.write(jpeg_header())
        f.truncate(size)
    return path


def write_cifar(base: Path, labels=(0, 1, 2, 3), names=None, batch=None):
    """A CIFAR-10 folder of 4-image batches; `batch` (name, labels) gives one batch other labels."""
    base.mkdir(parents=True, exist_ok=True)
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": names or [str(i) for i in range(10)]}))
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        y = batch[1] if batch and batch[0] == name else list(labels)
        (base / name).write_bytes(pickle.dumps({"data": np.zeros((len(y), 3072), dtype=np.uint8), "labels": y}))
    return base.parent


def tiny_vit_file(path):
    state = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4).state_dict()
    checkpoint.save_checkpoint(state, path, with_checksum=False)
    return path


# -- 1. files that never end or block: through the real command lines, with a timeout ------------

@pytest.fixture(scope="module")
def endless(tmp_path_factory):
    root = tmp_path_factory.mktemp("endless")
    fifo_cifar = write_cifar(root / "fifo_cifar" / "cifar-10-batches-py")
    batch = fifo_cifar / "cifar-10-batches-py" / "data_batch_2"
    batch.unlink()
    os.mkfifo(batch)  # open() of a named pipe waits for a writer that never comes
    os.mkfifo(root / "weights.pth")
    sparse_jpeg(root / "huge.jpg", 20 * 2 ** 30)  # over the size cap: refused unopened
    sparse_jpeg(root / "under_cap.jpg", 200 * 2 ** 20)  # under it: PIL's header scan is cut short
    return root


HANG_CASES = [  # (script, args, what the one line must say); {w} is the sandbox
    ("knn_eval", ["--raw_pixels", "--data", "{w}/fifo_cifar"], "data_batch_2 is not a regular file"),
    ("knn_eval", ["--pretrained", "{w}/weights.pth"], "weights.pth is not a regular file"),
    ("visualize", ["views", "--image", "{w}/huge.jpg"], "is 20480 MiB, over the 256 MiB"),
    ("visualize", ["views", "--image", "{w}/under_cap.jpg"], "under_cap.jpg could not be read"),
]


@pytest.mark.parametrize("script,args,message", HANG_CASES, ids=[" ".join(c[1]) for c in HANG_CASES])
def test_files_that_never_end_give_one_line_in_bounded_time(endless, tmp_path, script, args, message):
    args = [a.format(w=endless) for a in args]
    args += ["--device", "cpu"] if script == "knn_eval" else ["--out", str(tmp_path / "out")]
    result = subprocess.run([sys.executable, str(ROOT / f"{script}.py"), *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=HANG_TIMEOUT)  # kills it then
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert {p.name for p in tmp_path.iterdir()} <= {"out"}


def finishes(fn, fifo: Path, seconds: float = HANG_TIMEOUT):
    """fn()'s value if it returns within `seconds`; else open the pipe's other end (so the blocked
    reader wakes and the test process can end) and fail."""
    out = {}

    def call():
        try:
            out["value"] = fn()
        except Exception as e:  # raised again in the test's own thread
            out["error"] = e

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"reading the named pipe {fifo} blocked")
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_a_named_pipe_among_the_images_is_skipped_not_opened(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    assert finishes(lambda: data.read_rgb(fifo), fifo) is None
    assert not data.image_file_ok(fifo)
    with pytest.raises(data.DinoError, match="pipe.png is not a regular file"):
        finishes(lambda: visualize.read_image(fifo), fifo)


# -- 6. EXIF orientation ---------------------------------------------------------------------------

def test_an_exif_rotated_jpeg_is_decoded_upright(tmp_path):
    path = tmp_path / "sideways.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": a camera held upright
    Image.new("RGB", (40, 20), (10, 200, 30)).save(path, exif=exif.tobytes())
    assert data.read_rgb(path).size == (20, 40)
    assert visualize.read_image(path).shape == (3, 40, 20)
    with data.open_image(path) as im:
        assert data.displayed_size(im) == (20, 40)


# -- 7. hidden files and folders -------------------------------------------------------------------

def test_hidden_folders_and_files_are_never_part_of_a_data_set(tmp_path):
    for c in ("a", "b", ".ipynb_checkpoints"):
        write_png(tmp_path / "labelled" / "train" / c / "0.png")
    write_png(tmp_path / "labelled" / "train" / "a" / "._0.png")  # macOS's shadow file
    _, train, _ = data.load_data(str(tmp_path / "labelled"))
    assert train.classes == ["a", "b"] and len(train) == 2
    write_png(tmp_path / "loose" / "0.png")
    write_png(tmp_path / "loose" / "._0.png")
    write_png(tmp_path / "loose" / "train" / ".ipynb_checkpoints" / "1.png")  # not a labelled split
    _, kind, _ = data.locate(str(tmp_path / "loose"))
    assert kind == "images" and data.scan_images(tmp_path / "loose").files == [str(tmp_path / "loose" / "0.png")]
