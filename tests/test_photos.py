"""visualize.py on a user's photos: --image takes folders and quoted patterns, --heads writes each
head's map and mask at --resolution, no --image draws the checkpoint's own evaluation images
(CIFAR-10 included), masks/ beside the photos give Jaccards, and `video` writes one GIF frame per
input frame. Tiny untrained networks; the whole file runs in well under a minute on a CPU."""

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import dino
import vit
import visualize

ROOT = Path(__file__).resolve().parents[1]


def save_checkpoint(path: Path, **explicit) -> str:
    """A dino.py checkpoint of small untrained networks (vit_nano, 4 heads, 4 px patches)."""
    cfg = dino.make_config(dict(arch="vit_nano", out_dim=64, hidden_dim=64, bottleneck_dim=32,
                                local_crops_number=2, output_dir=str(path.parent), **explicit),
                           image_size=32, name="shapes")
    torch.manual_seed(0)
    student, teacher = dino.build_networks(cfg, "cpu")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"student": student.state_dict(), "teacher": teacher.state_dict(),
                "config": dino.config_to_dict(cfg)}, path)
    return str(path)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Networks this small run fastest on one thread: on a busy 2-core machine the second
    thread's waits made each forward pass 50 times slower. Restored for the other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("run") / "checkpoint.pth")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """20 random RGB JPEGs of 40-80 px in 4 subfolders (two of them share the stem 'img0')."""
    root = tmp_path_factory.mktemp("photos")
    g = np.random.default_rng(0)
    for i in range(20):
        folder = root / f"trip{i % 4}"
        folder.mkdir(exist_ok=True)
        h, w = g.integers(40, 81, size=2)
        Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i // 4}.jpg")
    (root / ".hidden.jpg").write_bytes(b"")  # hidden files are left out
    return root


def composites(out: Path) -> list:
    return sorted(out.glob("attention_*.png"))


def test_a_folder_and_a_quoted_pattern_draw_every_photo(photos, checkpoint, tmp_path):
    visualize.main(["attention", "--checkpoint", checkpoint, "--image", str(photos),
                    "--out", str(tmp_path / "folder")])
    drawn = composites(tmp_path / "folder")
    assert len(drawn) == 20
    assert (tmp_path / "folder" / "attention_trip0-img0.png").is_file()  # stems repeat: the path
    visualize.main(["attention", "--checkpoint", checkpoint, "--image", str(photos / "trip*" / "*.jpg"),
                    "--out", str(tmp_path / "pattern")])
    assert [p.name for p in composites(tmp_path / "pattern")] == [p.name for p in drawn]
    assert visualize.expand_images([str(photos / "trip1" / "*.jpg")])[0][0] == photos / "trip1" / "img0.jpg"
    for path in drawn[:3]:
        assert np.asarray(Image.open(path)).std() > 10  # something is drawn


def test_heads_writes_each_heads_map_and_mask_at_the_resolution(photos, checkpoint, tmp_path):
    out = tmp_path / "out"
    visualize.main(["attention", "--checkpoint", checkpoint, "--image", str(photos / "trip2"),
                    "--heads", "--resolution", "64", "--out", str(out)])
    assert len(composites(out)) == 5
    for stem in ("img0", "img4"):
        sizes = {}
        for name in ["image", "attn-mean", "mask-mean"] + [f"{kind}-head{k}" for kind in ("attn", "mask")
                                                             for k in (1, 2, 3, 4)]:
            with Image.open(out / stem / f"{name}.png") as im:
                im.load()
                sizes[name] = im.size
                if name.startswith("mask"):
                    values = set(np.unique(np.asarray(im)))
                    assert values <= {0, 255} and 255 in values
        assert len(set(sizes.values())) == 1 and min(sizes["image"]) == 64
        assert not (out / stem / "attn-head5.png").exists()  # vit_nano: 4 heads


def test_the_default_resolution_is_480_px(tmp_path):
    torch.manual_seed(0)
    torch.save(vit.vit_nano(patch_size=16).state_dict(), tmp_path / "weights.pth")  # authors' layout
    Image.fromarray(np.full((40, 60, 3), 90, np.uint8)).save(tmp_path / "photo.png")
    visualize.main(["attention", "--pretrained", str(tmp_path / "weights.pth"), "--image",
                    str(tmp_path / "photo.png"), "--heads", "--out", str(tmp_path / "out")])
    with Image.open(tmp_path / "out" / "photo" / "attn-head1.png") as im:
        assert im.size == (720, 480)


def test_a_long_photo_is_cut_to_the_token_cap_at_the_resolution():
    photo = torch.zeros(3, 900, 1200, dtype=torch.uint8)  # 480 x 640 at 480 px: 60 x 80 patches of 8
    cut, _, was_cut = visualize.cut_to_tokens(photo, 8, 480)
    assert was_cut and visualize.fit_to_patches(cut, 8, 480).shape == (3, 480, 544)  # 60 x 68 ≤ 4096
    square = torch.zeros(3, 500, 500, dtype=torch.uint8)
    assert visualize.cut_to_tokens(square, 8, 480)[0] is square
    with pytest.raises(data.DinoError, match="take --resolution 512 or less"):
        visualize.resolution_for(8, 1000)
    assert visualize.resolution_for(4, 0)[0] == 256  # 480 px of 4 px patches: 120 x 120, too many


def write_cifar(root: Path, colour):
    """A fake CIFAR-10 folder in the python-pickle layout: train batches of noise, test images of
    one colour."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    noise = np.random.default_rng(0).integers(0, 256, (4, 3072), dtype=np.uint8)
    for i in range(1, 6):
        (base / f"data_batch_{i}").write_bytes(pickle.dumps({"data": noise, "labels": [0, 1, 2, 3]}))
    test = np.repeat(np.array(colour, np.uint8), 1024)[None].repeat(3, 0)  # planes r, g, b
    (base / "test_batch").write_bytes(pickle.dumps({"data": test, "labels": [4, 5, 6]}))


def test_no_image_draws_the_checkpoints_own_cifar10_test_images(tmp_path, capsys):
    write_cifar(tmp_path / "cifar10", (230, 20, 20))
    ck = save_checkpoint(tmp_path / "run" / "checkpoint.pth", data=str(tmp_path / "cifar10"))
    assert visualize.config_from_checkpoint(ck).data == str(tmp_path / "cifar10")
    visualize.main(["attention", "--checkpoint", ck, "--heads", "--resolution", "32"])
    assert "CIFAR-10 test images 0 of" in capsys.readouterr().out
    image = np.asarray(Image.open(tmp_path / "run" / "sample" / "image.png")).reshape(-1, 3).mean(0)
    assert image == pytest.approx([230, 20, 20], abs=3)  # the test image drawn, not shapes
    # the folder gone: built-in shapes, and a note
    (tmp_path / "cifar10" / "cifar-10-batches-py" / "test_batch").rename(tmp_path / "test_batch")
    (tmp_path / "cifar10" / "cifar-10-batches-py").rename(tmp_path / "moved")
    visualize.main(["attention", "--checkpoint", ck, "--samples", "2", "--out", str(tmp_path / "out")])
    said = capsys.readouterr().out
    assert "is not here" in said and "built-in set shapes" in said
    assert len(composites(tmp_path / "out")) == 2


def test_no_image_draws_a_folder_checkpoints_val_images(tmp_path, capsys):
    root = tmp_path / "pets"
    for split, colour in (("train", 0), ("val", 200)):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((40, 48, 3), colour, np.uint8)).save(root / split / c / f"{i}.png")
    ck = save_checkpoint(tmp_path / "run" / "checkpoint.pth", data=str(root))
    visualize.main(["attention", "--checkpoint", ck, "--samples", "2", "--heads", "--resolution", "32"])
    assert "(val; the checkpoint's data)" in capsys.readouterr().out
    for name in ("cat-0", "dog-0"):  # one per class: spread over the split, named by their paths
        assert np.asarray(Image.open(tmp_path / "run" / name / "image.png")).mean() == pytest.approx(200, abs=2)


def test_masks_beside_the_photos_give_each_heads_jaccard(photos, checkpoint, tmp_path, monkeypatch):
    root = tmp_path / "with_masks"
    for f in sorted((photos / "trip3").glob("*.jpg"))[:2]:
        (root / "trip3").mkdir(parents=True, exist_ok=True)
        (root / "trip3" / f.name).write_bytes(f.read_bytes())
        h, w = np.asarray(Image.open(f)).shape[:2]
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255
        (root / "masks" / "trip3").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(root / "masks" / "trip3" / f.with_suffix(".png").name)
    titles = []
    real = visualize.attention_figure

    def spy(*args, **kwargs):
        fig = real(*args, **kwargs)
        titles.append([ax.get_title() for ax in fig.axes])
        return fig

    monkeypatch.setattr(visualize, "attention_figure", spy)
    visualize.main(["attention", "--checkpoint", checkpoint, "--image", str(root), "--out",
                    str(tmp_path / "out")])
    assert len(titles) == 2  # the masks are not drawn as photos
    for shown in titles:
        jaccards = [t for t in shown if t.startswith("Jaccard ")]
        assert len(jaccards) == 5  # 4 heads and their mean
        assert all(0 <= float(t.split()[1]) <= 1 for t in jaccards)


def seven_frames(folder: Path) -> list:
    g = np.random.default_rng(1)
    folder.mkdir()
    frames = [g.integers(0, 256, (36, 48, 3), dtype=np.uint8) for _ in range(7)]
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{i:03d}.png")
    return frames


def test_video_writes_one_gif_frame_per_input_frame(checkpoint, tmp_path):
    frames = seven_frames(tmp_path / "frames")
    visualize.main(["video", "--checkpoint", checkpoint, "--frames", str(tmp_path / "frames"),
                    "--head", "2", "--resolution", "32", "--out", str(tmp_path / "head2.gif")])
    with Image.open(tmp_path / "head2.gif") as gif:
        assert gif.n_frames == 7 and min(gif.size) == 32
    # a GIF in, the mean of heads out
    pictures = [Image.fromarray(f) for f in frames]
    pictures[0].save(tmp_path / "clip.gif", save_all=True, append_images=pictures[1:], duration=50)
    with Image.open(tmp_path / "clip.gif") as gif:
        assert gif.n_frames == 7
    visualize.main(["video", "--checkpoint", checkpoint, "--video", str(tmp_path / "clip.gif"),
                    "--resolution", "32", "--out", str(tmp_path / "mean.gif")])
    with Image.open(tmp_path / "mean.gif") as gif:
        assert gif.n_frames == 7 and gif.info["duration"] == 50
    # a still clip: PIL merges equal frames, yet the GIF keeps 7
    (tmp_path / "still").mkdir()
    for i in range(7):
        pictures[0].save(tmp_path / "still" / f"{i}.png")
    visualize.main(["video", "--checkpoint", checkpoint, "--frames", str(tmp_path / "still"),
                    "--resolution", "32", "--out", str(tmp_path / "still.gif")])
    with Image.open(tmp_path / "still.gif") as gif:
        assert gif.n_frames == 7


def test_bad_video_input_gives_one_line(checkpoint, tmp_path):
    (tmp_path / "clip.mp4").write_bytes(b"\0" * 100)
    cases = [(["--frames", str(tmp_path)], "holds no image files"),
             (["--frames", str(tmp_path), "--out", str(tmp_path / "x.avi")], "give a .gif or .mp4"),
             (["--frames", str(tmp_path), "--head", "9"], "the model has 4 heads")]
    import torchvision
    if not hasattr(torchvision.io, "write_video"):
        cases.append((["--frames", str(tmp_path), "--out", str(tmp_path / "x.mp4")], "cannot write MP4"))
    if not hasattr(torchvision.io, "read_video"):
        cases.append((["--video", str(tmp_path / "clip.mp4")], "cannot decode video files"))
    for args, message in cases:  # in this process: DinoError is the one line main() prints
        with pytest.raises(data.DinoError, match=message):
            visualize.main(["video", "--checkpoint", checkpoint, *args])
    result = subprocess.run([sys.executable, str(ROOT / "visualize.py"), "video", "--checkpoint",
                             checkpoint, "--frames", str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:"), result.stderr
