"""A folder of one's own images: unlabelled folders at any depth, and the leave-one-out k-NN
monitor of a run on them."""

import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import data
import knn_eval



def save_shape(image_u8, path, size=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(image_u8.permute(1, 2, 0).numpy())
    (image.resize(size, Image.BICUBIC) if size else image).save(path)
    return path


@pytest.fixture(scope="module")
def nested(tmp_path_factory):
    """Photos the way people keep them: at the top, in folders, in folders of folders, of two
    sizes, with an empty file, a damaged one, a note and a hidden thumbnail folder among them."""
    root = tmp_path_factory.mktemp("nested") / "photos"
    shapes = data.make_shapes(18, seed=5)
    folders = [root, root / "2021", root / "2021" / "july", root / "trip" / "day 1" / "beach"]
    good = [save_shape(shapes.images[i], folders[i % 4] / f"img{i:02d}.png",
                       (40, 36) if i % 3 else None) for i in range(18)]
    (root / "2021" / "empty.jpg").write_bytes(b"")  # an interrupted copy: left out when scanned
    broken = root / "trip" / "broken.JPG"
    broken.write_bytes(b"\xff\xd8\xff\xe0 cut short")  # fails to decode: skipped where it is read
    (root / "notes.txt").write_text("not an image")
    save_shape(shapes.images[0], root / ".thumbnails" / "img00.png")  # hidden: not a photo of the set
    return root, sorted(good), broken


def test_a_folder_without_classes_is_every_image_under_it(nested, tmp_path):
    root, good, broken = nested
    assert data.locate(str(root))[1] == "images"
    name, train, evaluation = data.load_data(str(root))
    assert name == "photos" and evaluation is None and not data.has_labels(train)
    # sorted paths, at every depth; the damaged file is found only when it is decoded
    assert train.files == [str(p) for p in sorted(good + [broken])]
    assert train.unreadable == [str(root / "2021" / "empty.jpg")]
    assert train.labels.tolist() == [0] * 19 and train.images is None  # two sizes: read per image
    # a labelled val/ beside the photos is held out of them and becomes the evaluation split
    copy = tmp_path / "photos"
    shutil.copytree(root, copy)
    for c in ("cat", "dog"):
        save_shape(torch.zeros(3, 32, 32, dtype=torch.uint8), copy / "val" / c / "0.png")
    _, train, evaluation = data.load_data(str(copy))
    assert len(train) == 19 and not any("/val/" in f for f in train.files)
    assert evaluation.classes == ["cat", "dog"] and data.has_labels(evaluation)
    # a train/ folder without class folders is no labelled layout either
    flat = tmp_path / "flat"
    save_shape(torch.zeros(3, 32, 32, dtype=torch.uint8), flat / "train" / "a.png")
    assert data.locate(str(flat))[1] == "images" and data.load_data(str(flat))[1].files == [
        str(flat / "train" / "a.png")]


def test_leave_one_out_knn_by_hand():
    """Points on the unit circle at angles 0, 0.1, 0.2 (class 0) and 2, 2.05 (class 1), voting on
    themselves with k = 3, T = 10 (cosine similarity s = cos of the angle between two points)."""
    angles = torch.tensor([0.0, 0.1, 0.2, 2.0, 2.05], dtype=torch.float64)
    x = torch.stack([angles.cos(), angles.sin()], dim=1)
    y = torch.tensor([0, 0, 0, 1, 1])
    # a point that may vote for itself is right every time: it is its own nearest neighbour
    assert knn_eval.knn_accuracy(x, y, x, y, k=3, temperature=10.0, num_classes=2)[0] == 100.0
    # left out, the point at 2.0 has neighbours 2.05 (class 1) and 0.2, 0.1 (class 0):
    # score(0) = e^{cos 1.8 / 10} + e^{cos 1.9 / 10} = 1.946 > score(1) = e^{cos 0.05 / 10} = 1.105;
    # the point at 2.05 likewise; the three of class 0 keep two neighbours of their class: 3 of 5
    score_0 = math.exp(math.cos(1.8) / 10) + math.exp(math.cos(1.9) / 10)
    assert (round(score_0, 3), round(math.exp(math.cos(0.05) / 10), 3)) == (1.946, 1.105)
    for chunk_size in (5, 2):  # chunks of 2 start at rows 0, 2, 4: the diagonal moves with them
        top1, _ = knn_eval.knn_accuracy(x, y, x, y, k=3, temperature=10.0, num_classes=2,
                                        leave_one_out=True, chunk_size=chunk_size)
        assert top1 == pytest.approx(60.0)
    # k as large as the set: the point itself is among the k, with weight e^{-inf} = 0
    assert knn_eval.knn_accuracy(x, y, x, y, k=5, temperature=0.07, num_classes=2,
                                 leave_one_out=True)[0] == pytest.approx(100.0)


def test_the_monitor_of_an_unlabelled_run_votes_among_the_labelled_split(nested, tmp_path):
    """Trainer.knn with no training labels: the labelled val/ beside the photos votes on its own
    images, each leaving itself out; by hand, the same from the teacher's features."""
    import dino
    root, _, _ = nested
    shapes = data.make_shapes(16, seed=9)
    folder = tmp_path / "photos"
    shutil.copytree(root, folder)
    for i in range(16):
        save_shape(shapes.images[i], folder / "val" / data.SHAPES[int(shapes.labels[i])] / f"{i}.png")
    _, train, evaluation = data.load_data(str(folder))
    cfg = dino.make_config(dict(arch="vit_nano", patch_size=8, out_dim=16, hidden_dim=16,
                                bottleneck_dim=8, device="cpu", output_dir=str(tmp_path / "o")), 32, "photos")
    trainer = dino.Trainer(cfg, train, evaluation, quiet=True)
    backbone = trainer.teacher.backbone.eval()
    f, y = knn_eval.extract_features(backbone, data.eval_batches(evaluation, 32), "cpu")
    expected = knn_eval.knn_accuracy(f, y, f, y, k=20, num_classes=len(evaluation.classes),
                                     leave_one_out=True)[0]
    assert trainer.knn() == expected
    assert expected < 100.0  # without leaving itself out, k-NN on its own images scores 100 %
