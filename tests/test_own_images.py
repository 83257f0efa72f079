"""A folder of one's own images: unlabelled folders at any depth, the leave-one-out k-NN monitor,
and the embeddings (knn_eval.py --embed) checked against the features knn_eval extracts."""

import math
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import augment
import checkpoint
import data
import dino
import knn_eval
import vit

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--arch", "vit_nano", "--patch_size", "8", "--global_crops_size", "32", "--local_crops_size",
         "16", "--local_crops_number", "2", "--out_dim", "64", "--hidden_dim", "64",
         "--bottleneck_dim", "32", "--device", "cpu", "--num_workers", "0"]


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


def test_a_short_run_on_a_nested_unlabelled_folder_and_its_embeddings(nested, tmp_path):
    """Acceptance 1: one short epoch on the folder, then its embeddings: one row per readable
    image, in the reported order, equal to what knn_eval extracts for the same images laid out
    as a labelled data set."""
    root, good, broken = nested
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, str(ROOT / "dino.py"), "--data", str(root), *SMALL,
                          "--batch_size", "6", "--epochs", "1", "--output_dir", str(out)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "19 training images (no labels)" in run.stdout
    assert "no k-NN monitor" in run.stdout and "knn top1" not in run.stdout
    assert "empty.jpg" in run.stdout and "broken.JPG" in run.stdout

    lines = []
    assert knn_eval.main(["--embed", str(root), "--checkpoint", str(out / "checkpoint.pth"),
                          "--out", str(tmp_path / "emb.pth"), "--device", "cpu", "--batch_size", "5"],
                         log=lines.append) == 0
    embedded = torch.load(tmp_path / "emb.pth", weights_only=True)
    assert embedded["paths"] == [str(p) for p in good]  # the readable ones, in sorted path order
    assert embedded["unreadable"] == [str(root / "2021" / "empty.jpg"), str(broken)]
    assert embedded["features"].shape == (18, 64) and "labels" not in embedded
    assert any("skipped 2 unreadable" in line for line in lines)
    assert any(line.startswith("wrote (18, 64) features") and " s (" in line for line in lines)

    # the oracle: the same files as a labelled data set, through knn_eval's own k-NN path
    labelled = tmp_path / "labelled"
    for i, path in enumerate(good):
        (labelled / "train" / "all").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, labelled / "train" / "all" / f"{i:02d}.png")
    (labelled / "val" / "all").mkdir(parents=True)
    shutil.copy(good[0], labelled / "val" / "all" / "0.png")
    knn_eval.main(["--checkpoint", str(out / "checkpoint.pth"), "--data", str(labelled), "--k", "1",
                   "--device", "cpu", "--save_features", str(tmp_path / "knn.pth")], log=lambda *_: None)
    expected = torch.load(tmp_path / "knn.pth", weights_only=True)["train_features"]
    torch.testing.assert_close(embedded["features"], expected)
    assert torch.allclose(embedded["features"].norm(dim=1), torch.ones(18))  # the k-NN's unit vectors


def test_embeddings_of_an_in_memory_set_name_their_rows_and_keep_labels(tmp_path):
    """A folder of small images of one size is decoded into memory; its rows still name their
    files. --avgpool writes the probe's input: [CLS] and the mean patch token, unnormalised."""
    folder = tmp_path / "small"
    shapes = data.make_shapes(12, seed=2)
    for i in range(12):
        save_shape(shapes.images[i], folder / "train" / f"c{i % 2}" / f"{i:02d}.png")
    (folder / "train" / "c1" / "zero.png").write_bytes(b"")
    torch.manual_seed(0)
    backbone = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4).eval()
    torch.save(backbone.state_dict(), tmp_path / "b.pth")
    for flags in ([], ["--avgpool"]):
        knn_eval.main(["--embed", str(folder), "--pretrained", str(tmp_path / "b.pth"), "--device",
                       "cpu", "--out", str(tmp_path / "e.pth"), *flags], log=lambda *_: None)
        e = torch.load(tmp_path / "e.pth", weights_only=True)
        _, train, _ = data.load_data(str(folder))
        assert train.images is not None and e["paths"] == train.files  # in memory, paths kept
        assert e["unreadable"] == [str(folder / "train" / "c1" / "zero.png")]
        assert e["labels"].tolist() == train.labels.tolist() and e["classes"] == ["c0", "c1"]
        with torch.no_grad():  # the oracle: the network on the images, by hand
            x = augment.normalize(train.images.float() / 255)
            tokens = backbone.get_intermediate_layers(x, 1)[0]
        cls, mean_patch = tokens[:, 0], tokens[:, 1:].mean(1)
        expected = torch.cat([cls, mean_patch], 1) if flags else F.normalize(cls, dim=1)
        torch.testing.assert_close(e["features"], expected)


def test_knn_eval_on_unlabelled_data_and_embed_without_weights_are_one_line_errors(nested):
    root, _, _ = nested
    result = subprocess.run([sys.executable, str(ROOT / "knn_eval.py"), "--raw_pixels", "--data",
                             str(root)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "has no labels" in lines[0] and "--embed" in lines[0]
    for args, message in [(["--embed", str(root)], "--embed takes a network's weights"),
                          (["--embed", "shapes", "--export", "x.pth", "--pretrained", "w.pth"],
                           "two commands"),
                          (["--export", "x.pth", "--raw_pixels"], "--export takes a network's weights")]:
        with pytest.raises(data.DinoError, match=message):
            knn_eval.main(args, log=lambda *_: None)


def readme_blocks(section: str) -> list:
    """(language, code) of the code blocks of one `## section` of the README."""
    text = (ROOT / "README.md").read_text()
    part = text[text.index(f"## {section}\n"):]
    part = part[:part.find("\n## ", 1)]
    return re.findall(r"```(\w+)\n(.*?)```", part, flags=re.S)


def test_the_readme_section_runs_on_a_tiny_folder(tmp_path, monkeypatch, capsys):
    """Acceptance 5: the README's "Your own images" commands, as written, on a folder of 20 small
    photos in subfolders; the training command gets flags appended that make it tiny (later
    flags win). Then its Python lines, and the exported backbone gives the embeddings."""
    shapes = data.make_shapes(20, seed=7)
    for i in range(20):
        save_shape(shapes.images[i], tmp_path / "my_photos" / f"roll{i % 3}" / f"IMG_{i:04d}.png")
    (tmp_path / "my_photos" / "IMG_9999.png").write_bytes(b"")
    tiny = ["--arch", "vit_nano", "--patch_size", "8", "--epochs", "1", "--batch_size", "8",
            "--out_dim", "64", "--hidden_dim", "64", "--bottleneck_dim", "32", "--local_crops_number",
            "2", "--device", "cpu"]
    blocks = readme_blocks("Your own images")
    commands = [shlex.split(line.split("  #")[0]) for line in blocks[0][1].splitlines() if line.strip()]
    assert blocks[0][0] == "bash" and [c[:2] for c in commands] == [
        ["python", "dino.py"], ["python", "knn_eval.py"], ["python", "knn_eval.py"]]
    monkeypatch.chdir(tmp_path)
    for command in commands:  # each script's main(), as `python script.py` calls it
        if command[1] == "dino.py":
            assert dino.main(command[2:] + tiny) == 0
        else:
            assert knn_eval.main(command[2:]) == 0
    out = capsys.readouterr().out
    assert "20 training images (no labels)" in out and "IMG_9999.png" in out
    assert blocks[1][0] == "python"
    exec(blocks[1][1], {})
    shown = capsys.readouterr().out
    embedded = torch.load(tmp_path / "my_photos_embeddings.pth", weights_only=True)
    paths = embedded["paths"]
    assert len(paths) == 20 and paths == sorted(paths) and shown.startswith(f"['{paths[0]}', ")
    # the exported backbone is the network that made the embeddings
    model = checkpoint.load_backbone(tmp_path / "my_photos_vit.pth")
    _, train, _ = data.load_data("my_photos")
    features, _ = knn_eval.extract_features(model, data.eval_batches(train, model.img_size), "cpu")
    torch.testing.assert_close(features, embedded["features"])
