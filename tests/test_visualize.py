"""visualize.py: attention maps and masks checked against their definitions, PCA against an
eigen-decomposition, weights in the authors' layout, every command's PNG, and bad input."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image as plt_image
import pytest
import torch

import augment
import checkpoint
import data
import dino
import knn_eval
import vit
import visualize

ROOT = Path(__file__).resolve().parents[1]


def tiny_vit(**kwargs):
    torch.manual_seed(0)
    return vit.VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4,
                                 **kwargs).eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A fake dino.py run: a checkpoint of small untrained networks and a three-epoch log."""
    run = tmp_path_factory.mktemp("run")
    cfg = dino.make_config(dict(out_dim=64, hidden_dim=64, bottleneck_dim=32, local_crops_number=3,
                                output_dir=str(run)), image_size=32, name="shapes")
    student, teacher = dino.build_networks(cfg, "cpu")
    torch.save({"student": student.state_dict(), "teacher": teacher.state_dict(),
                "config": dino.config_to_dict(cfg)}, run / "checkpoint.pth")
    log_K = torch.log(torch.tensor(64.0)).item()
    with open(run / "log.jsonl", "w") as f:
        for epoch in (1, 2, 3):
            record = dict(epoch=epoch, loss=4.0 - 0.5 * epoch, teacher_entropy=3.0 - 0.4 * epoch,
                          kl=1.0 - 0.1 * epoch, log_K=log_K, center_norm=0.1, lr=1e-3 / epoch,
                          wd=0.04 + 0.02 * epoch, momentum=0.99 + 0.003 * epoch,
                          teacher_temp=0.04 + 0.01 * epoch, seconds=1.0)
            if epoch == 3:
                record["knn_top1"] = 42.0
            f.write(json.dumps(record) + "\n")
    return run


def write_png(path, height, width):
    from PIL import Image
    pixels = (torch.rand(height, width, 3) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return path


# ---- attention -----------------------------------------------------------------------------------

def test_attention_maps_are_on_the_patch_grid_and_rows_sum_to_one():
    model = tiny_vit()
    x = torch.rand(3, 16, 24)  # not square: a swapped grid would show in the shape
    row = visualize.cls_attention(model, x)
    assert row.shape == (4, 1 + 4 * 6)
    torch.testing.assert_close(row.sum(-1), torch.ones(4))
    maps = visualize.attention_maps(model, x)
    assert maps.shape == (4, 4, 6)
    # patch (i, j) is token 1 + i · 6 + j: the patch embedding flattens rows first
    torch.testing.assert_close(maps[:, 2, 5], row[:, 1 + 2 * 6 + 5])
    assert (maps >= 0).all()


def test_mask_on_a_hand_worked_example():
    a = torch.tensor([0.1, 0.4, 0.2, 0.3])
    # ascending 0.1 0.2 0.3 0.4, cumsum 0.1 0.3 0.6 1.0, > 1 − 0.6 keeps 0.3 and 0.4
    assert knn_eval.attention_mask(a, 0.6).tolist() == [False, True, False, True]
    # unnormalised input gives the same mask
    assert knn_eval.attention_mask(10 * a, 0.6).tolist() == [False, True, False, True]


@pytest.mark.parametrize("share", [0.3, 0.6, 0.9])
def test_mask_is_the_smallest_set_holding_the_share(share):
    g = torch.Generator().manual_seed(1)
    a = torch.rand(5, 8, generator=g, dtype=torch.float64) ** 3  # (rows, n), skewed like attention
    masks = knn_eval.attention_mask(a, share)
    for row, mask in zip(a, masks):
        p = row / row.sum()
        assert p[mask].sum() >= share - 1e-12
        # brute force over all 2^8 subsets: the fewest positions that hold the share
        fewest = min(len(s) for r in range(9) for s in itertools.combinations(range(8), r)
                     if p[list(s)].sum() >= share - 1e-12)
        assert mask.sum() == fewest


def test_images_are_resized_and_cropped_to_the_patch_grid():
    image = torch.randint(0, 256, (3, 37, 50), dtype=torch.uint8)
    assert visualize.fit_to_patches(image, 4).shape == (3, 36, 48)
    assert visualize.fit_to_patches(image, 4, size=32).shape == (3, 32, 40)  # 37x50 → 32x43 → 32x40
    with pytest.raises(data.DinoError):
        visualize.fit_to_patches(image[:, :3], 4)


# ---- PCA -----------------------------------------------------------------------------------------

def test_pca_colours_are_in_unit_range_and_follow_the_top_eigenvectors():
    g = torch.Generator().manual_seed(0)
    features = [torch.randn(3, 4, 16, generator=g), torch.randn(2, 5, 16, generator=g)]
    rgb = visualize.pca_rgb(features)
    assert [c.shape for c in rgb] == [(3, 4, 3), (2, 5, 3)]
    flat = torch.cat([c.reshape(-1, 3) for c in rgb])
    assert flat.min() >= 0 and flat.max() <= 1
    torch.testing.assert_close(flat.min(0).values, torch.zeros(3))  # min-max over all images
    torch.testing.assert_close(flat.max(0).values, torch.ones(3))
    # oracle: eigenvectors of the covariance matrix, largest eigenvalues first (sign is arbitrary)
    X = torch.cat([f.reshape(-1, 16) for f in features]).double()
    X = X - X.mean(0)
    _, vectors = torch.linalg.eigh(X.T @ X)
    for c in range(3):
        scores = X @ vectors[:, -1 - c]
        corr = torch.corrcoef(torch.stack([scores, flat[:, c].double()]))[0, 1]
        assert abs(corr) > 1 - 1e-5


def test_pca_gives_equal_patches_equal_colours_across_images():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(4, 4, 8, generator=g)
    a, b = visualize.pca_rgb([f, f.clone()])
    torch.testing.assert_close(a, b)


# ---- the authors' weights ------------------------------------------------------------------------

def test_authors_vit_small_16_loads_in_both_layouts_and_draws(tmp_path):
    torch.manual_seed(0)
    original = vit.vit_small(patch_size=16).eval()
    backbone = original.state_dict()
    torch.save(backbone, tmp_path / "dino_deitsmall16_pretrain.pth")  # the released backbone file
    # a training checkpoint of the authors: DDP student, and head keys beside the backbone's
    head = {"head.mlp.0.weight": torch.zeros(2048, 384), "head.last_layer.weight_g": torch.ones(8, 1)}
    torch.save({"teacher": {**{f"backbone.{k}": v for k, v in backbone.items()}, **head},
                "student": {f"module.{k}": v for k, v in
                            {**{f"backbone.{k}": v for k, v in backbone.items()}, **head}.items()},
                "epoch": 100}, tmp_path / "checkpoint.pth")
    x = torch.rand(1, 3, 32, 48)
    for name in ("dino_deitsmall16_pretrain.pth", "checkpoint.pth"):
        model = checkpoint.load_backbone(tmp_path / name)
        assert (model.embed_dim, len(model.blocks), model.num_heads, model.patch_size) == (384, 12, 6, 16)
        assert model.img_size == 224
        with torch.no_grad():
            torch.testing.assert_close(model(x), original(x))
    image = write_png(tmp_path / "photo.png", 70, 90)
    visualize.main(["attention", "--pretrained", str(tmp_path / "dino_deitsmall16_pretrain.pth"),
                    "--image", str(image), "--image_size", "64", "--out", str(tmp_path / "fig")])
    height, width = plt_image.imread(tmp_path / "fig" / "attention_photo.png").shape[:2]
    assert width / height == pytest.approx(1.6 * (6 + 2) / 3.6, rel=0.2)  # vit_small: 6 heads


def test_a_width_outside_archs_needs_num_heads(tmp_path):
    model = tiny_vit()  # width 32: no entry of vit.ARCHS
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()}},
               tmp_path / "checkpoint.pth")
    with pytest.raises(data.DinoError, match="--num_heads"):
        checkpoint.load_backbone(tmp_path / "checkpoint.pth")
    loaded = checkpoint.load_backbone(tmp_path / "checkpoint.pth", num_heads=4)
    x = torch.rand(3, 16, 16)
    torch.testing.assert_close(visualize.cls_attention(loaded, x), visualize.cls_attention(model, x))


# ---- every command writes its PNG ----------------------------------------------------------------

def test_every_command_writes_a_png(tmp_path, run_dir):
    ck = str(run_dir / "checkpoint.pth")
    image = str(write_png(tmp_path / "odd.png", 37, 50))
    out = tmp_path / "out"
    visualize.main(["attention", "--checkpoint", ck, "--out", str(out)])  # built-in sample
    visualize.main(["attention", "--checkpoint", ck, "--image", image, "--image", image,
                    "--share", "0.5", "--out", str(out)])
    visualize.main(["pca", "--checkpoint", ck, "--samples", "3", "--out", str(out)])
    visualize.main(["curves", "--run", str(run_dir), "--out", str(out)])
    visualize.main(["views", "--image", image, "--out", str(out / "image")])
    visualize.main(["views", "--checkpoint", ck, "--out", str(out / "sample")])
    visualize.main(["readme-figures", "--run", str(run_dir), "--samples", "3",
                    "--out", str(out / "readme")])
    written = ["attention_sample.png", "attention_odd.png", "pca.png", "curves.png",
               "image/views.png", "sample/views.png", "readme/attention.png", "readme/pca.png", "readme/curves.png",
               "readme/views.png"]
    for name in written:
        pixels = plt_image.imread(out / name)  # (H, W, 4) in [0, 1]: the file is a PNG
        assert pixels[..., :3].std() > 0.05, name  # something is drawn, not a blank canvas
    # the attention figure has a column per head (vit_nano: 4), the image and the mean: 6 columns
    # of 1.6 in at 3.6 in high; the PCA figure one column per sample (3)
    for name, columns in [("attention_sample.png", 6), ("readme/attention.png", 6), ("pca.png", 3)]:
        height, width = plt_image.imread(out / name).shape[:2]
        assert width / height == pytest.approx(1.6 * columns / 3.6, rel=0.2), name
    # default output folder: next to the checkpoint, and the run folder for curves
    visualize.main(["curves", "--run", str(run_dir)])
    assert (run_dir / "curves.png").is_file()


def test_views_are_the_training_views():
    cfg = dino.make_config(dict(local_crops_number=3), image_size=32, name="shapes")
    shapes = data.make_shapes(4, seed=0)
    original, views = visualize.make_views(shapes, 2, cfg, seed=5)
    assert torch.equal(original, shapes.images[2])
    expected = dino.multicrop(shapes.images[2:3], cfg, torch.Generator().manual_seed(5))
    assert [v.shape for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    for v, e in zip(views, expected):  # un-normalising gives back the [0, 1] views
        torch.testing.assert_close(augment.normalize(v[None]), e, atol=1e-5, rtol=0)


def test_curves_figure_returns_a_figure_with_the_entropy_bounds(run_dir):
    records = visualize.read_log(run_dir)
    fig = visualize.curves_figure(records)
    entropy_axis = next(ax for ax in fig.axes if ax.get_title().startswith("teacher entropy"))
    levels = sorted(line.get_ydata()[0] for line in entropy_axis.get_lines()[1:])
    assert levels == pytest.approx([0.0, records[-1]["log_K"]])


def test_knn_minutes_puts_each_run_at_its_training_minutes_with_its_final_top1_in_the_legend():
    # hand-worked: epochs of 60, 120 and 90 s, the k-NN after epochs 2 and 3, so the points are at
    # 3 and 4.5 minutes of training; a second run evaluated once, after 30 s
    runs = {"a": [dict(seconds=60.0), dict(seconds=120.0, knn_top1=40.0), dict(seconds=90.0, knn_top1=45.5)],
            "b": [dict(seconds=30.0, knn_top1=12.25)]}
    fig = visualize.knn_minutes_figure(runs, {"raw pixels": 45.8})
    ax = fig.axes[0]
    a, b, pixels = ax.get_lines()
    assert list(a.get_xdata()) == pytest.approx([3.0, 4.5]) and list(a.get_ydata()) == [40.0, 45.5]
    assert list(b.get_xdata()) == pytest.approx([0.5]) and list(b.get_ydata()) == [12.25]
    assert list(pixels.get_ydata()) == [45.8, 45.8]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["a: 45.50% at the end", "b: 12.25% at the end", "raw pixels: 45.8%"]


# ---- bad input: one line on stderr, no traceback -------------------------------------------------

def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "visualize.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_bad_input_gives_one_line_errors(tmp_path, run_dir):
    ck = str(run_dir / "checkpoint.pth")
    (tmp_path / "not_an_image.png").write_text("hello")
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.ones(64),
                "fc.weight": torch.zeros(1000, 2048)}, tmp_path / "resnet.pth")
    cases = [
        (["attention", "--checkpoint", ck, "--image", str(tmp_path / "missing.jpg")], "does not exist"),
        (["attention", "--checkpoint", ck, "--image", str(tmp_path / "not_an_image.png")], "could not be read"),
        (["attention", "--pretrained", str(tmp_path / "resnet.pth")], "holds no ViT backbone"),
    ]
    for args, message in cases:
        result = run_cli(*args)
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
        assert "Traceback" not in result.stderr
