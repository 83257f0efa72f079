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


def test_named_pipes_and_oversized_files_in_a_folder_are_skipped_and_named(tmp_path):
    for c in ("a", "b"):
        write_png(tmp_path / "train" / c / "0.png")
    os.mkfifo(tmp_path / "train" / "a" / "pipe.png")
    sparse_jpeg(tmp_path / "train" / "b" / "huge.jpg", 20 * 2 ** 30)
    train = data.scan_folder(tmp_path / "train")
    assert len(train) == 2 and sorted(Path(f).name for f in train.unreadable) == ["huge.jpg", "pipe.png"]


# -- 2. sizes that come from the input ------------------------------------------------------------

def test_a_long_thin_image_is_refused_before_its_attention_is_built(tmp_path):
    weights = tiny_vit_file(tmp_path / "vit.pth")
    long = write_png(tmp_path / "long.png", size=(10000, 3))  # 106667 x 32 px at 32 px: 53332 patches
    with pytest.raises(data.DinoError, match=r"13333x4 = 53332 patches of 8 px, more than the 4096"):
        visualize.main(["attention", "--pretrained", str(weights), "--image", str(long),
                        "--out", str(tmp_path / "out")])
    assert visualize.fit_to_patches(torch.zeros(3, 48, 64, dtype=torch.uint8), 8, 32).shape == (3, 32, 40)


# -- 3. flags: an upper bound where a value sizes memory or time, and no inf or nan ---------------

FLAG_CASES = [  # (command line, argv, what the error says)
    ("dino", ["--out_dim", "100000000"], "--out_dim must be at least 2 and at most 262144"),
    ("dino", ["--hidden_dim", "1000000"], "--hidden_dim must be at least 1 and at most 8192"),
    ("dino", ["--epochs", "1000000000"], "--epochs must be at least 1 and at most 1000000"),
    ("dino", ["--epochs", "1000000000", "--steps", "3"], "--epochs must be at least 1 and at most 1000000"),
    ("dino", ["--steps", "100000000"], "--steps must be at least 0 and at most 10000000"),
    ("dino", ["--warmup_teacher_temp_epochs", "1000000000"], "--warmup_teacher_temp_epochs must be at least 0 and at most 1000000"),
    ("dino", ["--time_limit", "1e308"], "--time_limit must be at least 0 and at most 1000000 minutes"),
    ("dino", ["--time_limit", "inf"], "--time_limit must be a finite number, got inf"),
    ("dino", ["--time_limit", "nan"], "--time_limit must be a finite number, got nan"),
    ("dino", ["--lr", "nan"], "--lr must be a finite number"),
    ("dino", ["--teacher_temp", "inf"], "--teacher_temp must be a finite number"),
    ("dino", ["--global_crops_scale", "0.4", "nan"], "--global_crops_scale must be a finite number"),
    ("dino", ["--seed", str(10 ** 20)], "--seed must be at least 0 and at most 2^63 - 1"),
    ("dino", ["--global_crops_size", "100000"], "--global_crops_size must be at least 1 and at most 4096 px"),
    ("dino", ["--patch_size", "1", "--global_crops_size", "224"], "50176 patches of 1 px, more than the 4096"),
    ("dino", ["--local_crops_number", "100000"], "--local_crops_number must be at least 0 and at most 64"),
    ("dino", ["--num_workers", "100000"], "--num_workers must be at least 0 and at most 64"),
    ("knn_eval", ["--raw_pixels", "--image_size", "100000"], "--image_size must be at least 0 and at most 4096 px"),
    ("knn_eval", ["--raw_pixels", "--image_size", "1024"], "with --raw_pixels it may be at most 256 px"),
    ("knn_eval", ["--raw_pixels", "--temperature", "inf"], "--temperature must be a finite number"),
    ("knn_eval", ["--raw_pixels", "--seed", str(10 ** 20)], "--seed must be at least 0 and at most 2^63 - 1"),
    ("visualize", ["pca", "--samples", "1000"], "--samples must be at least 1 and at most 64"),
    ("visualize", ["pca"] + ["--image", "x.png"] * 65, "65 --image files given; at most 64"),
    ("visualize", ["attention", "--image_size", "100000"], "--image_size must be at least 0 and at most 4096 px"),
    ("visualize", ["attention", "--share", "nan"], "--share must be a finite number"),
    ("visualize", ["views", "--seed", str(10 ** 20)], "--seed must be at least 0 and at most 2^63 - 1"),
]


@pytest.mark.parametrize("command,argv,message", FLAG_CASES, ids=[f"{c[0]} {' '.join(c[1])}"[:60] for c in FLAG_CASES])
def test_flags_are_bounded_and_finite(command, argv, message):
    # knn_eval reads no data here: should a check fail, the run stops at the missing folder
    # instead of extracting features at the size asked for
    call = {"dino": dino.parse_config, "visualize": visualize.main,
            "knn_eval": lambda a: knn_eval.main(a + ["--data", "/nonexistent/data"], log=print)}[command]
    with pytest.raises(data.DinoError) as error:
        call(argv)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_short_run_over_many_epochs_holds_no_array_of_epochs(monkeypatch):
    made = []
    for name in ("arange", "full", "linspace", "cat"):
        def spy(*args, original=getattr(torch, name), **kwargs):
            made.append(original(*args, **kwargs).numel())
            return original(*args, **kwargs)
        monkeypatch.setattr(torch, name, spy)
    plan = dino.schedules(dino.Config(epochs=data.MAX_EPOCHS, warmup_teacher_temp_epochs=30, steps=3), 100)
    monkeypatch.undo()
    assert {len(v) for v in plan.values()} == {3} and max(made) <= 30  # 3 steps, 30 ramp epochs
    assert plan["teacher_temp"].tolist() == [0.04, 0.07, 0.07]  # epochs 0, 333333, 666666
    with pytest.raises(data.DinoError, match="a run of 100000000 steps, more than the 10000000"):
        dino.schedules(dino.Config(epochs=data.MAX_EPOCHS), 100)


# -- 4. labels and shapes, checked when read ------------------------------------------------------

LABEL_CASES = [  # (labels of data_batch_3, label_names, what the error says)
    ([0, 1, 2, 99], None, "data_batch_3 holds the label 99 (int)"),
    ([0, -1, 2, 3], None, "data_batch_3 holds the label -1 (int)"),
    ([0, 1.0, 2, 3], None, "data_batch_3 holds the label 1.0 (float)"),
    ([0, "1", 2, 3], None, "data_batch_3 holds the label '1' (str)"),
    ([0, 10 ** 30, 2, 3], None, "data_batch_3 holds the label 1000000000000000000000000000000 (int)"),
    ([0, True, 2, 3], None, "data_batch_3 holds the label True (bool)"),
    ([0, 1, 2, 3], ["a", "b", "c"], "data_batch_1 holds the label 3 (int), but labels must be whole "
                                    "numbers from 0 to 2, one per name of the 3 label_names"),
    ([0, 1, 2, 3], [1, 2, 3, 4], "batches.meta has no list of label_names"),
]


@pytest.mark.parametrize("labels,names,message", LABEL_CASES, ids=[c[2][:40] for c in LABEL_CASES])
def test_cifar_labels_are_checked_when_loaded(tmp_path, labels, names, message):
    root = write_cifar(tmp_path / "cifar10" / "cifar-10-batches-py", names=names,
                       batch=("data_batch_3", labels))
    with pytest.raises(data.DinoError) as error:
        data.load_data(str(root))
    assert message in str(error.value) and "\n" not in str(error.value)


def features_file(path, **changes):
    f = dict(train_features=torch.randn(6, 16), train_labels=torch.tensor([0, 1, 2, 0, 1, 2]),
             test_features=torch.randn(3, 16), test_labels=torch.tensor([0, 1, 2]), classes=["a", "b", "c"])
    checkpoint.save_checkpoint({**f, **changes}, path)
    return str(path)


FEATURE_CASES = [  # (what is changed, what the error says)
    (dict(test_features=torch.randn(3, 8)), "the training features are 16-d, the test features 8-d"),
    (dict(train_labels=torch.tensor([0, 1, 2, 0, 1, 7])), "train_labels holds the label 7, beyond the 3 classes"),
    (dict(test_labels=torch.tensor([0, -1, 2])), "test_labels holds the label -1"),
    (dict(classes=["a"]), "train_labels holds the label 1, beyond the 1 classes"),
    (dict(classes="abc"), "'classes' is not a list of class names"),
    (dict(train_labels=torch.tensor([0, 1, 2])), "train_labels is not one whole-number label for each of the 6"),
    (dict(test_labels=torch.tensor([0.0, 1.0, 2.0])), "test_labels is not one whole-number label"),
    (dict(train_features=torch.randn(6)), "train_features is not an (N, D) tensor of floats"),
]


@pytest.mark.parametrize("changes,message", FEATURE_CASES, ids=[c[1][:40] for c in FEATURE_CASES])
def test_saved_features_that_do_not_fit_together_are_refused(tmp_path, changes, message):
    path = features_file(tmp_path / "features.pth", **changes)
    with pytest.raises(data.DinoError) as error:
        knn_eval.main(["--load_features", path, "--device", "cpu"], log=lambda *_: None)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_matching_features_still_evaluate(tmp_path):
    lines = []
    assert knn_eval.main(["--load_features", features_file(tmp_path / "f.pth"), "--device", "cpu",
                          "--k", "2"], log=lines.append) == 0
    assert any(line.startswith("knn top1@2=") for line in lines)


# -- 5. masks of the wrong size: refused in memory and from files, in the same words --------------

@pytest.mark.parametrize("side", [32, 80], ids=["held in memory", "read from files"])
def test_masks_of_the_wrong_size_are_refused_on_both_paths(tmp_path, side):
    """A mask of another shape is refused; one of the image's shape at another resolution (the
    Weizmann horses' masks are) is resized to the image: its measures equal the full-size mask's."""
    for split in ("train", "val"):
        for c in ("a", "b"):
            write_png(tmp_path / split / c / "0.png", size=(side, side))
            if split == "val":
                write_png(tmp_path / "masks" / split / c / "0.png", size=(side // 2, side // 4))
    pattern = (fr"mask .*masks/val/a/0.png is {side // 2}x{side // 4} px, its image .*val/a/0.png "
               fr"{side}x{side} px; a mask must have its image's size, or its shape at another resolution")
    with pytest.raises(data.DinoError, match=pattern):
        data.load_data(str(tmp_path))
    batches = {}
    for half in (None, "a"):  # full size, then a's at half the resolution: the same masks
        for c in ("a", "b"):
            mask_side = side // 2 if c == half else side
            mask = Image.new("L", (mask_side, mask_side), 0)
            mask.paste(255, (0, 0, mask_side // 2, mask_side))  # the left half is the object
            (tmp_path / "masks" / "val" / c / "0.png").parent.mkdir(parents=True, exist_ok=True)
            mask.save(tmp_path / "masks" / "val" / c / "0.png")
        _, _, val = data.load_data(str(tmp_path))
        assert (val.masks if side <= 64 else val.mask_files) is not None
        batches[half] = torch.cat([m for _, m in data.mask_batches(val, 32)])
    assert torch.equal(batches[None], batches["a"]) and batches[None][:, :, :16].all()


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


# -- 8. each unreadable file named once ------------------------------------------------------------

def test_two_unreadable_files_in_a_row_are_named_once_each(tmp_path):
    good = [write_png(tmp_path / f"{i}.png") for i in range(2)]
    bad = [tmp_path / "bad1.png", tmp_path / "bad2.png"]
    for path in bad:
        path.write_bytes(b"not an image")
    files = [str(good[0]), str(bad[0]), str(bad[1]), str(good[1])]
    dataset = data.FolderMultiCrop(data.ImageSet(labels=torch.zeros(4, dtype=torch.long), classes=["x"],
                                                 files=files), [transforms.RandomResizedCrop(8)], seed=0, epoch=0)
    named = [path for position in range(4) for path in dataset[(position, position)][1]]
    assert named == [str(bad[0]), str(bad[1])]  # bad1's stand-in bad2 failed too: named by its own item
