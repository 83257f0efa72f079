"""The built-in `objects` set and the paper's segmentation measure (Section 4.2.1): the Jaccard of
the 60 % attention masks against a brute-force computation on hand-made maps, the masks against
their images, the knn_eval line, the outline on the figure, and the supervised baseline."""

import re

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import checkpoint
import data
import dino
import knn_eval
import vit
import visualize


# -- the measure, brute force: plain Python over lists, written from the rule's words -------------

def brute_force_mask(values, share):
    """Keep position i when the mass of every value ≤ a_i (ties included) exceeds 1 − share."""
    total = sum(values)
    p = [v / total for v in values]
    return [sum(q for q in p if q <= p_i) > 1 - share for p_i in p]


def brute_force_jaccard(kept_patches, grid_w, patch, truth):
    """IoU of the patch mask, spread over its pixels, with a ground truth given as rows of 0/1."""
    inter = union = 0
    for r, row in enumerate(truth):
        for c, t in enumerate(row):
            a = kept_patches[(r // patch) * grid_w + c // patch]
            inter += a and t
            union += a or t
    return 1.0 if union == 0 else inter / union


def test_mask_on_hand_worked_maps_with_ties():
    # ascending 0.1 0.2 0.2 0.5: the two 0.2 straddle the boundary 1 − 0.6 = 0.4 (cumsum 0.3 and
    # 0.5); they are kept together, whatever order a sort puts them in
    a = torch.tensor([0.2, 0.5, 0.1, 0.2])
    assert knn_eval.attention_mask(a, 0.6).tolist() == [True, True, False, True]
    assert knn_eval.attention_mask(a[[3, 1, 2, 0]], 0.6).tolist() == [True, True, False, True]
    # a tie wholly below the boundary (cumsum at its end 0.3) is dropped together
    b = torch.tensor([0.15, 0.5, 0.15, 0.2])
    assert knn_eval.attention_mask(b, 0.6).tolist() == [False, True, False, True]
    # a uniform map keeps every position
    assert knn_eval.attention_mask(torch.full((6,), 0.3), 0.6).all()


class FixedAttention(nn.Module):
    """A 'backbone' whose last attention is given: (B, heads, 1 + N, 1 + N), [CLS] row set."""

    def __init__(self, cls_rows, patch):
        super().__init__()
        self.cls_rows, self.patch_size = cls_rows, patch  # (B, heads, N)

    def get_last_selfattention(self, x):
        B, heads, N = self.cls_rows.shape
        attn = torch.full((B, heads, 1 + N, 1 + N), 1.0 / (1 + N))
        attn[:, :, 0, 0] = 0.0
        attn[:, :, 0, 1:] = self.cls_rows
        return attn


def test_jaccard_against_brute_force_on_hand_made_maps():
    patch, gh, gw = 2, 2, 3  # images of 4 x 6 px, 6 patches
    rows = torch.tensor([
        [[0.1, 0.2, 0.2, 0.5, 0.0, 0.0],     # a tie at the boundary (kept whole)
         [1, 1, 1, 1, 1, 1.0]],              # uniform: all kept
        [[0.05, 0.05, 0.3, 0.3, 0.2, 0.1],   # a tie at the top
         [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]],    # one patch holds everything
        [[0.35, 0.1, 0.1, 0.1, 0.05, 0.3],   # a tie of three below the boundary
         [0.2, 0.2, 0.2, 0.2, 0.1, 0.1]],    # a tie of four straddling the boundary
    ])
    truths = [
        [[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0]],
        [[0] * 6] * 4,                      # empty ground truth
        [[1] * 6] * 4,                      # the whole frame is foreground
    ]
    masks = torch.tensor(truths, dtype=torch.bool)  # (3, 4, 6)
    x = torch.zeros(3, 3, gh * patch, gw * patch)
    measures = knn_eval.attention_segmentation(FixedAttention(rows, patch), [(x, masks)], share=0.6)
    got, image = measures["jaccard"], measures["image"]
    assert got.shape == (2, 2) and image.tolist() == [0, 2]  # image 1 holds no object: no row
    for row, i in enumerate(image.tolist()):
        for h in range(2):
            kept = brute_force_mask(rows[i, h].tolist(), 0.6)
            expected = brute_force_jaccard(kept, gw, patch, truths[i])
            assert got[row, h].item() == pytest.approx(expected), (i, h)
    # by hand: image 0, head 0 keeps patches 1, 2, 3 (the tied 0.2s and 0.5): 12 px against the
    # truth's 10, 2 shared → 2 / 20; a full truth scores the share of the frame kept: 0.3 and
    # 0.35 (2 of 6 patches), then the tie of four 0.2s kept whole (4 of 6; the authors' sort would
    # keep 3 of them, in an order of its choosing)
    assert got[0, 0].item() == pytest.approx(2 / 20)
    assert got[1, 0].item() == pytest.approx(2 / 6)
    assert got[1, 1].item() == pytest.approx(4 / 6)
    # the image without objects has no AUROC and no mass ratio; a whole-frame object neither
    assert measures["auroc"][1].isnan().all() and measures["mass_ratio"][1].isnan().all()
    assert measures["auroc"][2].isnan().all()


def test_jaccard_of_empty_and_full_masks():
    empty, full = torch.zeros(4, 4, dtype=torch.bool), torch.ones(4, 4, dtype=torch.bool)
    assert knn_eval.jaccard(empty, empty).item() == 1.0  # two empty masks agree
    assert knn_eval.jaccard(full, empty).item() == 0.0
    half = full.clone()
    half[:2] = False
    assert knn_eval.jaccard(half, full).item() == 0.5


def test_report_headline_is_the_papers_protocol():
    """Per object the best head, then the images' mean: 0.6 and 0.8 → 0.7; one fixed head (2)
    scores the same here, the mean of heads 0.4."""
    measures = {"jaccard": torch.tensor([[0.2, 0.6, 0.4], [0.4, 0.8, 0.0]]), "image": torch.tensor([0, 1]),
                "auroc": torch.tensor([[0.5, 0.9, 0.6], [0.4, 0.7, 0.8]]),
                "mass_ratio": torch.tensor([[1.0, 2.0, 1.5], [0.5, 1.0, 3.0]])}
    lines = knn_eval.segmentation_report(measures)
    assert "jaccard@60=0.700" in lines and "jaccard@60_mean_heads=0.400" in lines
    assert "jaccard@60_fixed_head=0.700" in lines and "fixed best head 2: 0.700" in lines[0]
    # AUROC: best head per image 0.9 and 0.8 → 0.85; best fixed head (2: 0.8, or 3: 0.7) 0.8
    assert "attention_auroc=0.850" in lines and "attention_auroc_fixed_head=0.800" in lines
    assert "attention_mass_ratio=2.500" in lines


# -- the data set --------------------------------------------------------------------------------

def edges(images):
    """|horizontal| + |vertical| differences of gray images (N, H, W), cropped to (N, H-1, W-1)."""
    g = images[:, 0].float()
    return (g[:, 1:, :-1] - g[:, :-1, :-1]).abs() + (g[:, :-1, 1:] - g[:, :-1, :-1]).abs()


def test_objects_masks_match_their_images():
    d = data.make_objects(300, seed=5)
    S = data.OBJECTS_SIZE
    assert d.images.shape == (300, 3, S, S) and d.masks.shape == (300, S, S)
    assert d.masks.dtype == torch.bool
    share = d.masks.float().mean((1, 2))
    assert share.min() > 0.1 and share.max() < 0.6
    # the lattice lives in the object: its pixels have sharp edges, the smooth clutter has few;
    # a mask that were shifted, transposed or drawn from another image would mix the two
    e, inside = edges(d.images), d.masks[:, :-1, :-1]
    eroded = inside & ~edges(d.masks[:, None].expand(-1, 3, -1, -1).to(torch.uint8)).bool()
    mean_in = (e * eroded).sum((1, 2)) / eroded.sum((1, 2)).clamp_min(1)
    mean_out = (e * ~inside).sum((1, 2)) / (~inside).sum((1, 2))
    assert (mean_in > mean_out).all() and (mean_in > 2 * mean_out).float().mean() > 0.8
    # and the sharp edges (a step of more than 60 gray levels: the lattice and the object's rim,
    # not the clutter) lie on the mask or next to it, in every image but a few; a mask shifted
    # by 2 px keeps them in fewer than half the images
    grown = torch.nn.functional.max_pool2d(d.masks[:, None].float(), 3, 1, 1)[:, 0, :-1, :-1] > 0
    strong = e > 60
    on_mask = (strong & grown).sum((1, 2)) / strong.sum((1, 2)).clamp_min(1)
    assert on_mask.mean() > 0.99 and (on_mask > 0.95).float().mean() > 0.98
    assert torch.equal(d.images[:, 0], d.images[:, 1])  # gray, as shapes


def test_objects_are_deterministic_and_the_background_ignores_the_class():
    a, b = data.make_objects(40, seed=3), data.make_objects(40, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, data.make_objects(40, seed=4).images)
    # the background's gray level says nothing about the class: class means of the mean
    # background pixel vary less than the images of one class do
    d = data.make_objects(1600, seed=2, size=32)
    g = d.images[:, 0].float()
    background = (g * ~d.masks).sum((1, 2)) / (~d.masks).sum((1, 2))
    class_means = torch.stack([background[d.labels == k].mean() for k in range(8)])
    within = torch.stack([background[d.labels == k].std() for k in range(8)])
    assert class_means.std() < 0.2 * within.mean()


def test_silhouettes_tell_the_class_by_the_outline_only():
    d = data.make_silhouettes(400, seed=5)
    S = data.OBJECTS_SIZE
    assert d.images.shape == (400, 3, S, S) and d.masks.shape == (400, S, S)
    assert torch.equal(d.images, data.make_silhouettes(400, seed=5).images)
    g = d.images[:, 0].float() / 255
    # the mask is the flat fill: inside an eroded mask every pixel is the fill plus sensor noise
    # (0.25 ± 0.03), outside it the grain around 0.6; a mask of another image (or shifted) mixes them
    eroded = -torch.nn.functional.max_pool2d(-d.masks[:, None].float(), 3, 1, 1)[:, 0] > 0
    assert (g[eroded] - 0.25).abs().mean() < 0.03 and (g[~d.masks] - 0.6).abs().mean() > 0.05
    assert (g[~d.masks] - 0.6).mean().abs() < 0.01
    # no per-image cue: the background's level and amplitude are the same in every image, and
    # the object's share of the frame is the same for every class (15-30 %)
    outside = ~d.masks
    level = (g * outside).sum((1, 2)) / outside.sum((1, 2))
    spread = (((g - level[:, None, None]) ** 2 * outside).sum((1, 2)) / outside.sum((1, 2))).sqrt()
    assert level.std() < 0.01 and spread.std() < 0.1 * spread.mean()
    share = d.masks.float().mean((1, 2))
    assert share.min() > 0.13 and share.max() < 0.33
    class_share = torch.stack([share[d.labels == k].mean() for k in range(len(data.SHAPES))])
    assert class_share.std() < 0.3 * share.std()
    name, size = data.peek("silhouettes")
    assert size == S and dino.make_config({}, S, "silhouettes").patch_size == 8


def test_load_data_gives_objects_with_masks_on_both_splits(monkeypatch):
    drawn = []
    monkeypatch.setitem(data.BUILT_IN, "objects",  # 1 % of the images, for speed
                        lambda n, seed: drawn.append((n, seed)) or data.make_objects(n // 100, seed))
    name, train, evaluation = data.load_data("objects")
    S = data.OBJECTS_SIZE
    assert name == "objects" and drawn == [(10_000, 0), (2_000, 1)]
    assert train.images.shape[-1] == S and evaluation.masks.shape == (20, S, S)
    assert data.peek("objects") == ("objects", S)
    cfg = dino.make_config({}, S, "objects")  # the built-in preset, 8 x 8 patches of the global view
    assert cfg.arch == "vit_nano" and cfg.global_crops_size == S == 8 * cfg.patch_size


# -- knn_eval and visualize use the measure ------------------------------------------------------

@pytest.fixture(scope="module")
def run_checkpoint(tmp_path_factory):
    """A checkpoint of small untrained networks, as dino.py writes it, trained 'on objects'."""
    run = tmp_path_factory.mktemp("objects_run")
    cfg = dino.make_config(dict(data="objects", out_dim=64, hidden_dim=64, bottleneck_dim=32,
                                output_dir=str(run)), image_size=data.OBJECTS_SIZE, name="objects")
    student, teacher = dino.build_networks(cfg, "cpu")
    torch.save({"student": student.state_dict(), "teacher": teacher.state_dict(),
                "config": dino.config_to_dict(cfg)}, run / "checkpoint.pth")
    return run / "checkpoint.pth"


def test_knn_eval_prints_the_jaccard_where_the_split_has_masks(run_checkpoint, monkeypatch):
    small = {name: (lambda make: lambda n, seed: make(n // 20, seed))(make)  # 500 + 100 images
             for name, make in data.BUILT_IN.items()}
    monkeypatch.setattr(data, "BUILT_IN", small)
    lines = []
    knn_eval.main(["--checkpoint", str(run_checkpoint), "--data", "objects", "--device", "cpu"],
                  log=lines.append)
    found = [re.fullmatch(r"jaccard@60=(\d\.\d{3})", line) for line in lines]
    value = float(next(m for m in found if m).group(1))
    # the same number from the functions themselves
    backbone = checkpoint.load_backbone(run_checkpoint)
    _, _, evaluation = data.load_data("objects")
    measures = knn_eval.attention_segmentation(backbone, data.mask_batches(evaluation, backbone.img_size))
    # one object per image: the best head of each image, averaged over the images
    assert value == pytest.approx(measures["jaccard"].max(1).values.mean().item(), abs=5e-4)
    assert any(line.startswith("attention against the ground truth, 100 images") for line in lines)
    assert any(re.fullmatch(r"attention_auroc=\d\.\d{3}", line) for line in lines)
    # shapes has no masks: no Jaccard
    lines = []
    knn_eval.main(["--checkpoint", str(run_checkpoint), "--data", "shapes", "--device", "cpu"],
                  log=lines.append)
    assert not any("jaccard" in line for line in lines)


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_a_folder_with_masks_is_measured_and_half_masked_folders_are_refused(tmp_path, run_checkpoint):
    rng = np.random.default_rng(0)
    root = tmp_path / "voc_like"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            for i in range(4):
                write_png(root / split / cls / f"{i}.png",
                          rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
                if split == "val":
                    m = np.zeros((32, 32), dtype=np.uint8)
                    m[8:24, 4 + i:20 + i] = 255
                    write_png(root / "masks" / split / cls / f"{i}.png", m)
    _, _, evaluation = data.load_data(str(root))
    assert evaluation.masks.shape == (8, 32, 32) and evaluation.masks.sum() == 8 * 16 * 16
    lines = []
    knn_eval.main(["--checkpoint", str(run_checkpoint), "--data", str(root), "--device", "cpu",
                   "--random_init"], log=lines.append)
    assert any(re.fullmatch(r"jaccard@60=\d\.\d{3}", line) for line in lines)
    assert any("untrained ViT" in line for line in lines)
    (root / "masks" / "val" / "b" / "2.png").unlink()
    with pytest.raises(data.DinoError, match="masks for 7 of the 8 evaluation images"):
        data.load_data(str(root))


def test_the_attention_figure_draws_the_ground_truth_outline():
    torch.manual_seed(0)
    model = vit.VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=4).eval()
    d = data.make_objects(1, seed=1, size=32)
    with_outline = visualize.attention_figure(model, d.images[0], mask=d.masks[0])
    without = visualize.attention_figure(model, d.images[0])
    outlined = [ax for ax in with_outline.axes if ax.collections]
    assert len(outlined) == 1 + 6  # the image; the bottom row: the image, 4 heads, their mean
    assert not any(ax.collections for ax in without.axes)
    assert any(ax.get_title().startswith("Jaccard") for ax in with_outline.axes)


# -- the supervised baseline ---------------------------------------------------------------------

def test_supervised_baseline_trains_the_backbone_with_labels_and_leaves_the_dino_head(tmp_path):
    d = data.make_objects(64, seed=0, size=32)
    cfg = dino.make_config(dict(data="objects", supervised=True, batch_size=16, epochs=2,
                                patch_size=4, global_crops_size=32, local_crops_size=16,
                                warmup_epochs=0, out_dim=64, hidden_dim=64, bottleneck_dim=32,
                                local_crops_number=0, lr=0.05, min_lr=1e-3, device="cpu",
                                output_dir=str(tmp_path)), 32, "objects")
    trainer = dino.SupervisedTrainer(cfg, d, d, quiet=True)
    head = {k: v.clone() for k, v in trainer.student.head.state_dict().items()}
    backbone = {k: v.clone() for k, v in trainer.student.backbone.state_dict().items()}
    # the labels of a step are those of the images its views are cut from
    order = data.epoch_order(64, cfg.seed, 1)
    assert torch.equal(trainer.labels_at(trainer.steps_per_epoch + 2), d.labels[order[32:48]])
    logged = []
    history = trainer.fit(log=lambda *a: logged.append(" ".join(map(str, a))))
    assert history[-1]["loss"] < history[0]["loss"]  # cross-entropy falls on 64 images
    epoch_lines = [line for line in logged if line.startswith("epoch")]
    assert len(epoch_lines) == 2 and not any("nan" in line for line in epoch_lines)  # no teacher stats
    assert all(torch.equal(v, trainer.student.head.state_dict()[k]) for k, v in head.items())
    assert any(not torch.equal(v, trainer.student.backbone.state_dict()[k]) for k, v in backbone.items())
    ck = checkpoint.load_checkpoint(tmp_path / "checkpoint.pth")
    assert "classifier" in ck and ck["config"]["supervised"]
    # the teacher is a copy of the trained student: knn_eval and visualize read it as a run's teacher
    teacher = checkpoint.load_backbone(tmp_path / "checkpoint.pth")
    assert all(torch.equal(v, trainer.student.backbone.state_dict()[k]) for k, v in teacher.state_dict().items())


# -- the paper's protocol, AUROC and mass ratio, brute force --------------------------------------

def brute_force_auroc(scores, positive):
    """Count every (positive, negative) pair: 1 where the positive scores higher, 1/2 on a tie."""
    pos = [s for s, q in zip(scores, positive) if q]
    neg = [s for s, q in zip(scores, positive) if not q]
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg) / (len(pos) * len(neg))


def test_auroc_against_a_pairwise_count():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        n = int(torch.randint(2, 30, (1,), generator=generator))
        scores = torch.randint(0, 5, (3, n), generator=generator).float()  # few values: many ties
        positive = torch.rand(n, generator=generator) < 0.4
        if positive.all() or not positive.any():
            assert knn_eval.auroc(scores, positive).isnan().all()
            continue
        got = knn_eval.auroc(scores, positive)
        for h in range(3):
            assert got[h].item() == pytest.approx(brute_force_auroc(scores[h].tolist(), positive.tolist()))
    # by hand: positives 3, 1 against negatives 2, 1: (1 + 1) + (0 + 0.5) of 4 pairs
    assert knn_eval.auroc(torch.tensor([3.0, 1, 2, 1]), torch.tensor([1, 1, 0, 0]).bool()).item() == 0.625


def brute_force_protocol(rows, labels, patch, grid_w, share=0.6):
    """The paper's protocol from its words, over lists: for each image and each object in it, the
    best head's Jaccard; the mean over an image's objects, then over images. Also the fixed best
    head (one head for every image) and the mean over heads."""
    per_image_best, per_image_heads = [], []
    for i, truth in enumerate(labels):
        objects = sorted({v for row in truth for v in row} - {0, 255})
        if not objects:
            continue
        heads = len(rows[i])
        J = [[0.0] * heads for _ in objects]
        for h in range(heads):
            kept = brute_force_mask(rows[i][h], share)
            for o, k in enumerate(objects):
                inter = union = 0
                for r, row in enumerate(truth):
                    for c, t in enumerate(row):
                        if t == 255:
                            continue
                        a = kept[(r // patch) * grid_w + c // patch]
                        inter += a and t == k
                        union += a or t == k
                J[o][h] = 1.0 if union == 0 else inter / union
        per_image_best.append(sum(max(row) for row in J) / len(J))
        per_image_heads.append([sum(row[h] for row in J) / len(J) for h in range(heads)])
    per_head = [sum(img[h] for img in per_image_heads) / len(per_image_heads) for h in range(heads)]
    return sum(per_image_best) / len(per_image_best), max(per_head), sum(per_head) / heads


def test_the_papers_protocol_against_brute_force():
    """Two images, three heads, several objects: the best head differs per image (head 0 fits
    image 0, head 2 image 1), so the per-object best beats any fixed head; ties at the 60 %
    boundary are kept whole; VOID pixels are scored by no one; an image without objects is left out."""
    patch, gh, gw = 2, 2, 3
    rows = torch.tensor([
        [[0.3, 0.3, 0.1, 0.1, 0.1, 0.1],     # head 0 on the top-left object
         [0.1, 0.1, 0.1, 0.2, 0.2, 0.3],     # a tie of two 0.2 at the boundary
         [1, 1, 1, 1, 1, 1.0]],              # uniform
        [[0.5, 0.1, 0.1, 0.1, 0.1, 0.1],
         [0.1, 0.1, 0.4, 0.1, 0.2, 0.1],
         [0.0, 0.0, 0.0, 0.1, 0.45, 0.45]],  # head 2 on the bottom-right object
        [[0.2, 0.2, 0.2, 0.2, 0.1, 0.1]] * 3,
    ])
    labels = [
        [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 2, 2], [0, 0, 0, 0, 2, 2]],
        [[0, 0, 0, 0, 0, 0], [255, 0, 0, 0, 0, 0], [0, 0, 3, 3, 3, 3], [0, 0, 3, 3, 3, 3]],
        [[0] * 6] * 4,                       # no object: left out
    ]
    x = torch.zeros(3, 3, gh * patch, gw * patch)
    measures = knn_eval.attention_segmentation(FixedAttention(rows, patch), [(x, torch.tensor(labels))])
    assert measures["jaccard"].shape == (3, 3) and measures["image"].tolist() == [0, 0, 1]
    paper, fixed, mean = brute_force_protocol(rows.tolist(), labels, patch, gw)
    lines = knn_eval.segmentation_report(measures)
    assert f"jaccard@60={paper:.3f}" in lines
    assert f"jaccard@60_fixed_head={fixed:.3f}" in lines and f"jaccard@60_mean_heads={mean:.3f}" in lines
    assert paper > fixed + 0.05  # the per-image best head is not one head for all


def test_auroc_and_mass_ratio_of_hand_made_maps():
    """A uniform map: AUROC 0.5 and mass ratio 1 at any object size; a map on the object's
    patches alone: AUROC 1 and mass ratio 1 / (object share)."""
    patch = 2
    labels = torch.zeros(1, 4, 6, dtype=torch.long)
    labels[0, :2, :2] = 1  # one patch of six
    for on_object, auc, ratio in (([1.0] * 6, 0.5, 1.0), ([1.0, 0, 0, 0, 0, 0], 1.0, 6.0)):
        rows = torch.tensor([[on_object]])
        m = knn_eval.attention_segmentation(FixedAttention(rows, patch), [(torch.zeros(1, 3, 4, 6), labels)])
        assert m["auroc"].item() == pytest.approx(auc) and m["mass_ratio"].item() == pytest.approx(ratio)


def test_a_folder_of_photos_with_masks_and_no_labels_is_measured(tmp_path, run_checkpoint):
    """Images at any depth, ROOT/masks/<path>.png beside them, no labels: knn_eval skips the k-NN
    and prints the segmentation measures. A palette mask holds two objects and VOID pixels (as
    PASCAL VOC's): each object is scored on its own, VOID by no one."""
    rng = np.random.default_rng(1)
    root = tmp_path / "photos"
    for i, sub in enumerate(["", "a/", "a/b/"]):
        write_png(root / f"{sub}{i}.png", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        m = np.zeros((64, 64), dtype=np.uint8)
        m[8:40, 8:40] = 255  # binary: one object
        write_png(root / "masks" / f"{sub}{i}.png", m)
    palette = np.zeros((64, 64), dtype=np.uint8)
    palette[0:20, 0:20], palette[40:60, 30:60], palette[20, :] = 1, 2, data.VOID
    image = Image.fromarray(palette, mode="P")
    image.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [224, 224, 192] * 253)
    image.save(root / "masks" / "0.png")  # image 0's mask: two objects and a VOID line
    labels = data.read_labels(root / "masks" / "0.png")
    assert sorted(labels.unique().tolist()) == [0, 1, 2, data.VOID]
    assert data.read_mask(root / "masks" / "0.png").sum() == 20 * 20 + 20 * 30
    lines = []
    assert knn_eval.main(["--checkpoint", str(run_checkpoint), "--data", str(root), "--device", "cpu"],
                         log=lines.append) == 0
    assert not any(line.startswith("knn top1") for line in lines)
    assert any("no labels, so no k-NN" in line for line in lines)
    assert any(line.startswith("attention against the ground truth, 3 images with 4 object(s)")
               for line in lines)
    for name in ("jaccard@60", "jaccard@60_fixed_head", "attention_auroc", "attention_mass_ratio"):
        assert any(re.fullmatch(name + r"=\d+\.\d{3}", line) for line in lines), name
