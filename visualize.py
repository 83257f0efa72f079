"""Pictures of what DINO learns: attention maps, PCA of patch features, training curves, views.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021: Figure 1
and Figure 3 show the last block's [CLS] attention per head, which segments objects without
any label; Figure 7 shows the teacher's entropy and KL(P_t ‖ P_s) over training.

Every figure is a function that returns a matplotlib Figure (and saves it when given a path),
so notebooks call the same code as the command line. Figures are drawn with matplotlib's
object-oriented API (no pyplot), rendered to PNG by the Agg backend: no display is needed.

Run:  python visualize.py attention --checkpoint runs/shapes/checkpoint.pth   (built-in sample)
      python visualize.py attention --pretrained dino_deitsmall16_pretrain.pth --image cat.jpg
      python visualize.py attention --pretrained dino_deitsmall8_pretrain.pth --image photos/ --heads
      python visualize.py video --checkpoint runs/shapes/checkpoint.pth --frames clip/ --head 1
      python visualize.py pca --checkpoint runs/shapes/checkpoint.pth
      python visualize.py curves --run runs/shapes
      python visualize.py views                  (or --data ./cifar10 --index 7, or --image cat.jpg)
      python visualize.py readme-figures --run runs/shapes     (all of the above into assets/)
"""

import argparse
import glob
import itertools
import json
import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from einops import rearrange
from PIL import Image
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from tqdm import tqdm  # plain bars, as dino.py's

import augment
import checkpoint
import data
import dino
import vit
from data import DinoError, require
from knn_eval import attention_mask, jaccard, upsample

DEFAULT_OUT = Path("runs") / "figures"  # for figures that come from no checkpoint (ignored by git)


# ------------------------------------------------------------------------------------------------
# 1. Images: user files or built-in samples, cut to a multiple of the patch size.
# ------------------------------------------------------------------------------------------------

def read_image(path) -> torch.Tensor:
    """An image file as (3, H, W) uint8."""
    from torchvision.transforms.v2.functional import pil_to_tensor
    path = Path(path)
    try:
        data.regular_file(path, "image", data.IMAGE_MAX_BYTES)  # refused, not skipped: named once
    except OSError:
        raise DinoError(f"image {path} does not exist or is not a file") from None
    image = data.read_rgb(path)
    if image is None:
        raise DinoError(f"image {path} could not be read (not an image, or damaged)")
    return pil_to_tensor(image)


def sample_images(n: int, size: int, name: str = "shapes") -> list[torch.Tensor]:
    """n held-out images of a built-in set (the evaluation seed), drawn at size px."""
    return list(sample_set(n, size, name).images)


def sample_set(n: int, size: int, name: str = "shapes") -> data.ImageSet:
    """The first n held-out images of the built-in set `name` (its masks too, for objects)."""
    n_drawn = max(n, 8)  # image i depends on the set's n: the first 8 are the same for n ≤ 8
    drawn = data.BUILT_IN[name](n_drawn, seed=1, size=size)
    return data.ImageSet(labels=drawn.labels[:n], classes=drawn.classes, images=drawn.images[:n],
                         masks=None if drawn.masks is None else drawn.masks[:n])


def fit_to_patches(image: torch.Tensor, patch: int, size: int | None = None) -> torch.Tensor:
    """Resize (3, H, W) uint8 so its shorter side is `size` (None: keep), then centre-crop both
    sides down to a multiple of the patch size; returns a (3, H', W') float image in [0, 1]."""
    H, W = image.shape[-2:]
    if size is not None and min(H, W) != size:
        scale = size / min(H, W)
        H, W = max(1, round(H * scale)), max(1, round(W * scale))
    data.check_patches(H, W, patch, f"an image of {image.shape[-1]}x{image.shape[-2]} px, resized "
                       f"to a shorter side of {min(H, W)} px:", "crop it nearer to a "
                       "square, or lower --image_size")  # before resizing: the sequence sizes memory
    x = image.float() / 255
    if (H, W) != tuple(image.shape[-2:]):
        x = F.interpolate(x[None], size=(H, W), mode="bicubic", antialias=True)[0].clamp(0, 1)
    h, w = H // patch * patch, W // patch * patch
    if h == 0 or w == 0:
        raise DinoError(f"an image of {H}x{W} px is smaller than one {patch} px patch")
    top, left = (H - h) // 2, (W - w) // 2
    return x[:, top:top + h, left:left + w]


def show(ax, image, title=""):
    """Draw (3, H, W) or (H, W, 3) in [0, 1] with visible pixels, no ticks."""
    if image.shape[0] == 3:
        image = rearrange(image, "c h w -> h w c")
    ax.imshow(image.clamp(0, 1).numpy(), interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def save(fig: Figure, path) -> Figure:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=fig.dpi, bbox_inches="tight")
    return fig


# ------------------------------------------------------------------------------------------------
# 2. Self-attention maps (paper Figures 1 and 3).
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def cls_attention(backbone: vit.VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Last block's attention of [CLS] to every token, (heads, N), for one image x (3, H, W) in
    [0, 1]. Each row is a softmax over all N = 1 + patches tokens, so it sums to 1."""
    attn = backbone.get_last_selfattention(augment.normalize(x[None]))  # (1, heads, N, N)
    return attn[0, :, 0, :]  # (heads, N): the [CLS] query's row


def attention_maps(backbone: vit.VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """[CLS]→patch attention of each head on the patch grid, (heads, H/p, W/p)."""
    p = backbone.patch_size
    to_patches = cls_attention(backbone, x)[:, 1:]  # drop [CLS]→[CLS]
    return rearrange(to_patches, "nh (gh gw) -> nh gh gw", gh=x.shape[-2] // p, gw=x.shape[-1] // p)


def attention_of(backbone: vit.VisionTransformer, image: torch.Tensor, share: float = 0.6,
                 size: int | None = None, mask: torch.Tensor | None = None) -> dict:
    """What attention_figure and head_pngs draw of one image (3, H, W) uint8: x, the image
    fitted to the patches (3, H', W') in [0, 1]; mask, the ground truth (H', W') bool cut the same
    way, or None; maps, each head's [CLS] attention and their mean last (heads + 1, H'/p, W'/p);
    masks, the patches that keep `share` of each map's mass (knn_eval.attention_mask); patch."""
    p = backbone.patch_size
    x = fit_to_patches(image, p, size or backbone.img_size)
    if mask is not None:  # cut and resized as the image: its 0/255 picture, back to 0/1
        mask = fit_to_patches((255 * mask.to(torch.uint8)).expand(3, -1, -1), p,
                              size or backbone.img_size)[0] > 0.5
    maps = attention_maps(backbone, x)  # (heads, gh, gw)
    maps = torch.cat([maps, maps.mean(0, keepdim=True)])  # (heads + 1, gh, gw): the mean last
    masks = rearrange(attention_mask(rearrange(maps, "m gh gw -> m (gh gw)"), share),
                      "m (gh gw) -> m gh gw", gh=maps.shape[1])
    return dict(x=x, mask=mask, maps=maps, masks=masks, patch=p)


def attention_figure(backbone: vit.VisionTransformer, image: torch.Tensor, share: float = 0.6,
                     size: int | None = None, title: str = "", path=None,
                     mask: torch.Tensor | None = None, drawn: dict | None = None) -> Figure:
    """Top row: the image, each head's [CLS] attention, their mean. Bottom row: the masks that
    keep `share` of each map's mass (knn_eval.attention_mask), drawn over the image (dimmed
    outside the mask). With a ground-truth mask (H, W) bool of the image, its outline is drawn
    in cyan on the image and the masks, and each mask's Jaccard with it (knn_eval.jaccard) is
    written under it.

    image: (3, H, W) uint8 of any size; `size` px on its shorter side (None: the training size).
    drawn: attention_of's result for these arguments, when already computed.
    """
    a = drawn or attention_of(backbone, image, share, size, mask)
    x, mask, maps, masks, p = a["x"], a["mask"], a["maps"], a["masks"], a["patch"]
    heads = maps.shape[0] - 1
    columns = heads + 2
    fig = Figure(figsize=(1.6 * columns, 3.6), dpi=100, layout="constrained")
    axes = fig.subplots(2, columns)
    show(axes[0, 0], x, "image" + ("\n(cyan: ground truth)" if mask is not None else ""))
    show(axes[1, 0], x, f"masks keep {share:.0%}\nof the mass")
    for j in range(heads + 1):
        name = f"head {j + 1}" if j < heads else "mean of heads"
        axes[0, j + 1].imshow(upsample(maps[j], p).numpy(), cmap="inferno", interpolation="nearest")
        axes[0, j + 1].set_title(name, fontsize=9)
        axes[0, j + 1].set_axis_off()
        dim = 0.2 + 0.8 * upsample(masks[j], p).float()  # (H, W): 1 inside the mask, 0.2 outside
        show(axes[1, j + 1], x * dim,
             "" if mask is None else f"Jaccard {jaccard(upsample(masks[j], p), mask).item():.2f}")
    if mask is not None:
        for ax in [axes[0, 0], *axes[1]]:
            ax.contour(mask.float().numpy(), levels=[0.5], colors="cyan", linewidths=1.2)
    fig.suptitle(title or f"last-block [CLS] attention, {heads} heads, {p} px patches", fontsize=10)
    return save(fig, path)


def heat(values: torch.Tensor) -> torch.Tensor:
    """A map (H, W) as (H, W, 3) uint8 in matplotlib's inferno colours, min-max scaled."""
    v = (values - values.min()) / (values.max() - values.min()).clamp_min(1e-12)
    return (255 * torch.as_tensor(colormaps["inferno"](v.numpy())[..., :3])).round().to(torch.uint8)


def to_png(pixels: torch.Tensor, path: Path) -> Path:
    """(H, W, 3) or (H, W) uint8 as a PNG file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.contiguous().numpy()).save(path)
    return path


def head_pngs(drawn: dict, folder: Path) -> list[Path]:
    """attention_of's result as PNGs at the image's pixel size, each on its own: image.png (the
    image as cut to the patches), attn-head<k>.png (head k's attention, inferno colours, min-max
    scaled), mask-head<k>.png (its mask: 255 inside, 0 outside), attn-mean.png and mask-mean.png
    (the mean of heads); heads are numbered from 1, as in the composite."""
    p, maps, masks = drawn["patch"], drawn["maps"], drawn["masks"]
    heads = maps.shape[0] - 1
    written = [to_png((255 * rearrange(drawn["x"], "c h w -> h w c")).round().to(torch.uint8),
                      folder / "image.png")]
    for j in range(heads + 1):
        name = f"head{j + 1}" if j < heads else "mean"
        written.append(to_png(heat(upsample(maps[j], p)), folder / f"attn-{name}.png"))
        written.append(to_png(255 * upsample(masks[j], p).to(torch.uint8), folder / f"mask-{name}.png"))
    return written


# The authors' visualize_attention.py draws at 480 px; a grid of more than data.MAX_PATCHES patches
# is refused (its attention would not fit in memory), so photos are cut down to it at this size.
RESOLUTION = 480


def resolution_for(patch: int, asked: int) -> tuple[int, str]:
    """(the shorter side in px at which --heads draws, a note or ""): --resolution if given (a
    one-line error if even a square image would be more than data.MAX_PATCHES patches), else
    RESOLUTION, lowered to the largest square grid that fits."""
    most = math.isqrt(data.MAX_PATCHES) * patch  # a 64 x 64 grid
    if asked:
        require((asked // patch) ** 2 <= data.MAX_PATCHES,
                f"--resolution {asked} with {patch} px patches is at least a {asked // patch}x"
                f"{asked // patch} grid, more than the {data.MAX_PATCHES} patches whose attention "
                f"fits in memory; take --resolution {most} or less")
        return asked, ""
    if RESOLUTION <= most:
        return RESOLUTION, ""
    return most, (f"note: {RESOLUTION} px with {patch} px patches is more than {data.MAX_PATCHES} "
                  f"patches; drawing at {most} px (--resolution sets it)")


def cut_to_tokens(image: torch.Tensor, patch: int, size: int, mask=None) -> tuple:
    """(image, mask, cut): the image (3, H, W) and its mask (H, W) centre-cropped along the longer
    side so that, resized to `size` px on the shorter side and cut to the patches, it is at most
    data.MAX_PATCHES patches (a 480 x 640 photo with 8 px patches is 60 x 80 = 4800: cut to 60 x
    68); cut says whether it was. Cropped before resizing: a 10000 x 3 px file costs nothing."""
    H, W = image.shape[-2:]
    short, long = min(H, W), max(H, W)
    scale = size / short
    grid = max(1, size // patch)
    keep = max(short, math.floor((data.MAX_PATCHES // grid) * patch / scale))  # px of the original
    if long <= keep:
        return image, mask, False
    start = (long - keep) // 2
    if H > W:
        image = image[:, start:start + keep]
        mask = None if mask is None else mask[start:start + keep]
    else:
        image = image[:, :, start:start + keep]
        mask = None if mask is None else mask[:, start:start + keep]
    return image, mask, True


# ------------------------------------------------------------------------------------------------
# 3. PCA of patch features: the first three components as RGB.
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def patch_features(backbone: vit.VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Last block's normed patch tokens of one image x (3, H, W) in [0, 1], (H/p, W/p, D)."""
    p = backbone.patch_size
    tokens = backbone.get_intermediate_layers(augment.normalize(x[None]), n=1)[0]  # (1, N, D)
    return rearrange(tokens[0, 1:], "(gh gw) d -> gh gw d", gh=x.shape[-2] // p, gw=x.shape[-1] // p)


def pca_rgb(features: list[torch.Tensor]) -> list[torch.Tensor]:
    """Project every image's patch features (gh, gw, D) on the first 3 principal components of
    all images' patches together, so one part gets one colour in every image; (gh, gw, 3) in [0, 1]."""
    X = torch.cat([rearrange(f, "gh gw d -> (gh gw) d") for f in features]).double()  # (n, D)
    X = X - X.mean(0)
    # $$X = U S V^\top$$; the principal directions are the first columns of V
    _, _, Vt = torch.linalg.svd(X, full_matrices=False)
    Z = X @ Vt[:3].T  # (n, 3): scores on the first 3 components
    Z = F.pad(Z, (0, 3 - Z.shape[1]))  # fewer than 3 patches or dimensions: black channels
    # min-max over all images, per component, so colours compare across images
    Z = (Z - Z.min(0).values) / (Z.max(0).values - Z.min(0).values).clamp_min(1e-12)
    out, start = [], 0
    for f in features:
        gh, gw = f.shape[:2]
        out.append(rearrange(Z[start:start + gh * gw].float(), "(gh gw) c -> gh gw c", gh=gh))
        start += gh * gw
    return out


def pca_figure(backbone: vit.VisionTransformer, images: list[torch.Tensor], size: int | None = None,
               path=None) -> Figure:
    """Top row: the images; bottom row: their patch features' first 3 principal components as RGB."""
    p = backbone.patch_size
    xs = [fit_to_patches(im, p, size or backbone.img_size) for im in images]
    rgb = pca_rgb([patch_features(backbone, x) for x in xs])
    fig = Figure(figsize=(1.6 * len(xs), 3.6), dpi=100, layout="constrained")
    axes = fig.subplots(2, len(xs), squeeze=False)
    for j, (x, c) in enumerate(zip(xs, rgb)):
        show(axes[0, j], x)
        show(axes[1, j], upsample(rearrange(c, "gh gw c -> c gh gw"), p))
    fig.suptitle("patch features: first 3 principal components (one PCA over all images) as RGB",
                 fontsize=10)
    return save(fig, path)


# ------------------------------------------------------------------------------------------------
# 4. Training curves from log.jsonl and steps.jsonl (paper Figure 7 for one run).
# ------------------------------------------------------------------------------------------------

def read_log(run_dir, name: str = "log.jsonl", required: bool = True) -> list[dict]:
    """The records of a run's log.jsonl (one per epoch) or steps.jsonl (one every N steps); a
    file that is not required may be missing (runs from before step records). A last line that
    is not JSON (cut short by a kill) is left out; any other is an error."""
    path = Path(run_dir) / name
    try:
        data.regular_file(path, "log")  # a named pipe would block read_text() forever
    except OSError:
        require(not required, f"{path} does not exist; --run takes the --output_dir of a dino.py run")
        return []
    records = []
    lines = path.read_text(errors="replace").splitlines()
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if i == len(lines):
                    break  # the record a running run is writing, or was when it was killed
                raise DinoError(f"{path}, line {i}, is not JSON") from None
    if not records and required:
        raise DinoError(f"{path} is empty: no epoch has finished yet")
    return records


def read_run(run_dir) -> tuple[list[dict], list[dict]]:
    """(epoch records, step records) of a run; while its first epoch runs, the steps alone."""
    steps = read_log(run_dir, "steps.jsonl", required=False)
    return read_log(run_dir, required=not steps), steps


def curves_figure(records: list[dict], title: str = "", path=None, steps: list[dict] = ()) -> Figure:
    """Loss, collapse diagnostics, k-NN accuracy and the schedules, one panel each, over epochs:
    the epoch records of log.jsonl as dots, and the step records of steps.jsonl (if given) as
    lines, at x = epochs done after the step."""
    epochs = [r["epoch"] for r in records]
    xs = epochs + [s["epoch"] for s in steps]
    fig = Figure(figsize=(13, 5.6), dpi=100, layout="constrained")
    axes = fig.subplots(2, 4)

    def panel(ax, key, label, schedule=False, **style):
        if steps:
            ax.plot([s["epoch"] for s in steps], [s.get(key, math.nan) for s in steps], "-", lw=1,
                    alpha=1.0 if schedule else 0.6, **style)
        if records and not (steps and schedule):  # the schedules' epoch values lie on the step line
            ys = [r.get(key, math.nan) for r in records]
            ax.plot(epochs, ys, "o" if steps else "o-", markersize=3, **style)
        style_axis(ax, label)

    def style_axis(ax, label):
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_xlim(0 if steps else min(xs) - 0.5, max(xs) + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)

    panel(axes[0, 0], "loss", "DINO loss  H(P_t, P_s)")
    ax = axes[0, 1]
    panel(ax, "teacher_entropy", "teacher entropy h(P_t)")
    # Figure 7: h(P_t) → 0 is collapse to one dimension, h(P_t) → log K to the uniform distribution
    log_K = (list(records) or list(steps))[-1]["log_K"]
    ax.axhline(0, color="tab:red", ls="--", lw=1, label="0: one-dimension collapse")
    ax.axhline(log_K, color="tab:purple", ls="--", lw=1, label=f"log K = {log_K:.2f}: uniform")
    ax.legend(fontsize=7, loc="best")
    panel(axes[0, 2], "kl", "KL(P_t ‖ P_s) = loss − h(P_t)")
    ax = axes[0, 3]
    knn = [(r["epoch"], r["knn_top1"]) for r in records if "knn_top1" in r]
    if knn:
        ax.plot(*zip(*knn), "o-", color="tab:green", markersize=4)
        ax.set_ylim(0, 100)
    else:
        ax.text(0.5, 0.5, "no k-NN measured\n(dino.py --knn_every N)", ha="center", va="center",
                transform=ax.transAxes)
    style_axis(ax, "k-NN top-1 (%)")
    panel(axes[1, 0], "lr", "learning rate" if steps else "learning rate (end of epoch)", True,
          color="tab:orange")
    panel(axes[1, 1], "wd", "weight decay", True, color="tab:orange")
    panel(axes[1, 2], "momentum", "teacher momentum λ", True, color="tab:orange")
    panel(axes[1, 3], "teacher_temp", "teacher temperature τ_t", True, color="tab:orange")
    what = f"{len(records)} epochs" + (
        f" (dots: epoch means), {len(steps)} step records (lines)" if steps else "")
    fig.suptitle(f"{title + ': ' if title else 'training curves, '}{what}", fontsize=11)
    return save(fig, path)


def knn_minutes_figure(runs: dict, baselines: dict = (), title: str = "", path=None) -> Figure:
    """k-NN top-1 against minutes of training (log.jsonl's epoch seconds, summed; evaluation not
    counted), one line per run ({label: epoch records}), baselines ({label: top-1}) dashed. Each
    run's final k-NN is in the legend: runs that end level would overlap labels drawn at the ends."""
    fig = Figure(figsize=(6.4, 4), dpi=100, layout="constrained")
    ax = fig.subplots()
    for label, records in runs.items():
        minutes = itertools.accumulate(r["seconds"] / 60 for r in records)
        points = [(m, r["knn_top1"]) for m, r in zip(minutes, records) if "knn_top1" in r]
        require(points, f"{label}: no k-NN in its log.jsonl (dino.py --knn_every N)")
        ax.plot(*zip(*points), "o-", markersize=4, label=f"{label}: {points[-1][1]:.2f}% at the end")
    for (label, top1), color in zip(dict(baselines).items(), ("tab:gray", "tab:red", "tab:purple")):
        ax.axhline(top1, ls="--", lw=1, color=color, label=f"{label}: {top1:.1f}%")
    ax.set_xlabel("minutes of training")
    ax.set_ylabel("weighted k-NN top-1 (%)")
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title or "k-NN accuracy against training time", fontsize=10)
    return save(fig, path)


def run_knn_minutes(args):
    runs = {Path(run).name: read_log(run) for run in args.run}
    baselines = {}
    for text in args.baseline or []:
        label, _, value = text.rpartition("=")
        try:
            baselines[label] = float(value)
        except ValueError:
            raise DinoError(f"--baseline {text!r} is not LABEL=PERCENT (e.g. 'raw pixels=45.8')") from None
    out = Path(args.out) if args.out else Path(args.run[0])
    path = out / "knn_minutes.png"
    knn_minutes_figure(runs, baselines, args.title, path=path)
    return [path]


# ------------------------------------------------------------------------------------------------
# 5. Multi-crop views: the augmentation pipeline made visible.
# ------------------------------------------------------------------------------------------------

def make_views(images: data.ImageSet, index: int, cfg: dino.Config, seed: int = 0) -> tuple:
    """(original (3, H, W) uint8, views [(3, S, S) in [0, 1]]) of one image, as training makes them."""
    generator = torch.Generator().manual_seed(seed)
    if images.images is not None:
        original = images.images[index]
        views = dino.multicrop(original[None], cfg, generator)  # list of (1, 3, S, S), normalised
    else:
        # the crops of item (position, index) are seeded by (seed, epoch, position)
        crops, unreadable = data.FolderMultiCrop(images, dino.per_image_crops(cfg), seed, 0)[(0, index)]
        require(not unreadable, f"image {unreadable[0] if unreadable else ''} could not be read "
                                f"(not an image, or damaged)")
        original = read_image(images.files[index])
        views = dino.finish_views([c[None] for c in crops], cfg, generator)
    return original, [augment.unnormalize(v)[0] for v in views]


def views_figure(original: torch.Tensor, views: list[torch.Tensor], path=None) -> Figure:
    """Top row: the image and the 2 global views (teacher and student); bottom: the local views
    (student only). Panels share one pixel scale, so local views look as small as they are."""
    n_local = len(views) - 2
    columns = max(3, n_local)
    big = max(v.shape[-1] for v in views)
    fig = Figure(figsize=(1.7 * columns, 4.0), dpi=100, layout="constrained")
    axes = fig.subplots(2, columns, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    H, W = original.shape[-2:]
    show(axes[0, 0], original.float() / 255, f"image, {W}x{H} px")
    for j, v in enumerate(views):
        S = v.shape[-1]
        ax = axes[0, j + 1] if j < 2 else axes[1, j - 2]
        who = "teacher + student" if j < 2 else "student"
        name = f"global {j + 1}" if j < 2 else f"local {j - 1}"
        pad = (big - S) / 2  # centre smaller views in a frame of the global size
        ax.imshow(rearrange(v, "c h w -> h w c").numpy(), interpolation="nearest",
                  extent=(pad, pad + S, pad + S, pad))
        ax.set_xlim(0, big)
        ax.set_ylim(big, 0)
        ax.set_title(f"{name}, {S} px\n({who})", fontsize=8)
    fig.suptitle(f"multi-crop: {len(views) - n_local} global + {n_local} local views of one image",
                 fontsize=10)
    return save(fig, path)


def config_from_checkpoint(path) -> dino.Config:
    """The Config a dino.py run was trained with."""
    ck = checkpoint.load_checkpoint(Path(path))
    require(isinstance(ck, dict) and isinstance(ck.get("config"), dict),
            f"{path} is not a checkpoint of dino.py (it has no config)")
    return dino.config_from_dict(ck["config"])


# ------------------------------------------------------------------------------------------------
# 6. Command line.
# ------------------------------------------------------------------------------------------------

def model_and_out(args):
    """The backbone asked for, and the output folder: --out, else next to the weights."""
    path = args.checkpoint or args.pretrained
    if path is None:
        raise DinoError("give --checkpoint (a dino.py checkpoint) or --pretrained (ViT weights)")
    backbone = checkpoint.load_backbone(path, num_heads=args.num_heads)
    if getattr(args, "random_init", False):
        backbone = vit.untrained_like(backbone, seed=0)
    return backbone, Path(args.out) if args.out else Path(path).parent


def built_in_of(args) -> str:
    """The built-in set whose held-out images to draw: the checkpoint's, if it trained on one."""
    if args.checkpoint:
        trained_on = config_from_checkpoint(args.checkpoint).data
        if trained_on in data.BUILT_IN:
            return trained_on
    return "shapes"


def expand_images(values: list) -> list[tuple[Path, Path, bool]]:
    """(file, root, named) for each --image value, in the order given: a file as it is (its root
    its folder); a folder, every image file under it at any depth, sorted (data.scan_images:
    hidden files and its masks/ folder left out); a pattern with * ? or [ ] (quoted, so that we
    expand it), its matching image files, sorted, its root the part before the first wildcard.
    named: the file was named itself (a damaged one is an error, not skipped)."""
    found = []
    for value in values:
        path = Path(value).expanduser()
        if path.is_dir():
            scanned = data.scan_images(path, exclude=(path / data.MASKS_FOLDER,))
            for f in scanned.unreadable:
                print(f"note: skipped {f} (empty, too large, or not a regular file)")
            found += [(Path(f), path, False) for f in scanned.files]
        elif not path.exists() and glob.has_magic(str(path)):
            parts = path.parts
            root = Path(*parts[:next(i for i, part in enumerate(parts) if glob.has_magic(part))] or ".")
            matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
            files = [m for m in matches if m.suffix.lower() in data.IMAGE_EXTENSIONS and m.is_file()
                     and (root / data.MASKS_FOLDER) not in m.parents]
            require(files, f"--image {value} matches no image file "
                           f"({', '.join(sorted(data.IMAGE_EXTENSIONS))})")
            found += [(m, root, False) for m in files]
        else:
            found.append((path, path.parent, True))
    return found


def output_names(files: list[tuple[Path, Path]]) -> list[str]:
    """A distinct name per (file, root) for its PNGs: the file's stem; where stems repeat, its
    path under its root without the suffix, '/' written '-' (a/1.jpg: a-1); then with the
    suffix (a-1.jpg); a file given twice gets -2, -3, ..."""
    def candidates(f, root):
        rel = f.relative_to(root) if root in f.parents else Path(f.name)
        return [f.stem, "-".join(rel.with_suffix("").parts), "-".join(rel.parts)]

    options = [candidates(f, root) for f, root in files]
    names = [c[0] for c in options]
    for level in (1, 2):  # a name shared by different files: the longer one
        shared = Counter(n for n, _ in {(n, f) for n, (f, _) in zip(names, files)})
        names = [c[level] if shared[n] > 1 else n for n, c in zip(names, options)]
    seen, unique = Counter(), []
    for n in names:
        seen[n] += 1
        unique.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    return unique


def mask_beside(file: Path, root: Path) -> Path | None:
    """ROOT/masks/<the file's path under ROOT>.png (data.MASKS_FOLDER's layout), if it is a file."""
    rel = file.relative_to(root) if root in file.parents else Path(file.name)
    mask = root / data.MASKS_FOLDER / rel.with_suffix(".png")
    return mask if mask.is_file() else None


def spread(n: int, total: int) -> list[int]:
    """n indices spread evenly over range(total), the first 0 (a split sorted by class: several)."""
    return [i * total // n for i in range(min(n, total))]


def own_samples(args, n: int, size: int) -> list[tuple]:
    """(name, image, mask) of n images of the evaluation split of the data the checkpoint was
    trained on (its config's --data): a built-in set's held-out images; CIFAR-10's test images;
    a folder's val/ or test/ split (with its masks/), or its images when it has none. Prints where
    they come from; built-in shapes, with a note, when that data is not here."""
    trained_on = config_from_checkpoint(args.checkpoint).data if args.checkpoint else "shapes"
    names = ["sample"] if n == 1 else [f"sample{i + 1}" for i in range(n)]

    def built_in(name, why=""):
        held_out = sample_set(n, size, name)
        print(f"{why}drawing {n} held-out image{'s' * (n > 1)} of the built-in set {name}")
        masks = [None] * n if held_out.masks is None else list(held_out.masks)
        return list(zip(names, held_out.images, masks))

    if trained_on in data.BUILT_IN:
        return built_in(trained_on)
    root = Path(trained_on).expanduser()
    missing = f"note: the checkpoint's data {trained_on} is not here; "
    if not root.is_dir():
        return built_in("shapes", missing)
    _, kind, root = data.locate(trained_on)
    if kind == "cifar10":
        if not (root / "cifar-10-batches-py").is_dir():
            return built_in("shapes", missing)
        _, test = data.load_cifar10(root)
        chosen = spread(n, len(test))
        print(f"drawing CIFAR-10 test images {', '.join(map(str, chosen))} of {root} "
              f"(the checkpoint's data)")
        return [(name, test.images[i], None) for name, i in zip(names, chosen)]
    if kind == "folder":
        splits = [root / s for s in ("val", "test") if (root / s).is_dir()]
        split = splits[0] if splits else root / "train"
        images = data.with_masks(data.scan_folder(split), root)
    else:
        beside = data.labelled_beside(root)
        split = beside[0] if beside else root
        images = data.with_masks(data.scan_folder(split) if beside else data.scan_images(
            root, exclude=(root / data.MASKS_FOLDER,)), root)
    chosen = spread(n, len(images))
    which = "its training images: it has no val/ or test/" if split.name == "train" or split == root else split.name
    print(f"drawing {len(chosen)} images of {root} ({which}; the checkpoint's data)")
    files = [Path(images.files[i]) for i in chosen]
    names = names if n == 1 else output_names([(f, split) for f in files])  # val/a/1, val/b/1: a-1, b-1
    return [(name, f, Path(images.mask_files[i]) if images.mask_files else None)
            for name, f, i in zip(names, files, chosen)]


def run_attention(args):
    backbone, out = model_and_out(args)
    p = backbone.patch_size
    to_tokens = bool(args.heads or args.resolution)  # photos: cut to the token cap, not refused
    require(not (args.resolution and args.image_size), "give --resolution or --image_size, not both")
    if to_tokens:
        size, note = resolution_for(p, args.resolution)
        if note:
            print(note)
    else:
        size = args.image_size or backbone.img_size
    if args.image:
        found = expand_images(args.image)
        require(len(found) <= 64, f"--image gives {len(found)} images; at most 64 are drawn (a figure "
                                  f"each): name a subfolder, or a narrower pattern")
        require(not args.mask or len(args.mask) == len(found),
                f"give one --mask per image, in the same order ({len(found)} images, "
                f"{len(args.mask or [])} masks); for a folder, put its masks in DIR/masks/")
        masks = args.mask or [mask_beside(f, root) for f, root, _ in found]
        items = [(name, f, m and Path(m), named) for name, (f, _, named), m
                 in zip(output_names([(f, root) for f, root, _ in found]), found, masks)]
    else:
        items = [(name, image, mask, True) for name, image, mask in own_samples(args, args.samples, size)]
    written = []
    bar = tqdm(items, desc="attention", unit="image", disable=len(items) < 2, leave=False)
    for name, image, mask, named in bar:
        if isinstance(image, Path):
            try:
                image = read_image(image)
            except DinoError as e:
                if named:
                    raise
                bar.write(f"note: skipped {e}")
                continue
        if isinstance(mask, Path):
            path, mask = mask, data.read_mask(mask)
            data.require_mask_fits(path, mask.shape[::-1], name, image.shape[:-3:-1])
            mask = data.fit_mask(mask, image.shape[:-3:-1])
        if to_tokens:
            image, mask, cut = cut_to_tokens(image, p, size, mask)
            if cut:
                bar.write(f"note: {name}: its longer side is cropped to keep {size} px on the shorter "
                          f"side within {data.MAX_PATCHES} patches of {p} px")
        drawn = attention_of(backbone, image, args.share, size, mask)
        path = out / f"attention_{name}.png"
        attention_figure(backbone, image, args.share, size, path=path, drawn=drawn)
        written.append(path)
        if args.heads:
            head_pngs(drawn, out / name)
            written.append(out / name)  # one line for its PNGs, not 2 · heads + 3
    return written


def run_pca(args):
    backbone, out = model_and_out(args)
    size = args.image_size or backbone.img_size
    if args.image:
        found = expand_images(args.image)
        require(len(found) <= 64, f"--image gives {len(found)} images; at most 64 (a panel each)")
        images = [read_image(f) for f, _, _ in found]
    else:
        images = sample_images(args.samples, size, built_in_of(args))
    path = out / "pca.png"
    pca_figure(backbone, images, size, path=path)
    return [path]


def run_curves(args):
    path = (Path(args.out) if args.out else Path(args.run)) / "curves.png"
    records, steps = read_run(args.run)
    curves_figure(records, title=f"{args.run}: training curves", path=path, steps=steps)
    return [path]


def run_views(args):
    if args.image:
        read_image(args.image)  # a one-line error for a missing or unreadable file
        name, images = "image", data.ImageSet(labels=torch.zeros(1, dtype=torch.long),
                                            classes=["image"], files=[args.image])
    elif args.data:
        name, images, _ = data.load_data(args.data)
    else:
        name, images = "shapes", in_memory(sample_images(1, 32)[0])
    require(0 <= args.index < len(images), f"--index {args.index} is outside the {len(images)} images")
    if args.checkpoint:
        cfg = config_from_checkpoint(args.checkpoint)
    else:
        cfg = dino.make_config({}, data.probe_image_size(images), name)
    original, views = make_views(images, args.index, cfg, args.seed)
    path = (Path(args.out) if args.out else DEFAULT_OUT) / "views.png"
    views_figure(original, views, path=path)
    return [path]


# ------------------------------------------------------------------------------------------------
# 5b. Video: one head's attention (or the mean of heads) over every frame.
# ------------------------------------------------------------------------------------------------

MAX_FRAMES = 300  # frames of a video: a 300-frame GIF at 480 px is held in memory (~300 MB)


def frame_files(folder: Path) -> list[Path]:
    """The image files of a folder of frames, sorted by name (not its subfolders)."""
    require(folder.is_dir(), f"--frames {folder} is not a folder")
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in data.IMAGE_EXTENSIONS
                   and data.visible(f) and f.is_file())
    require(files, f"--frames {folder} holds no image files ({', '.join(sorted(data.IMAGE_EXTENSIONS))})")
    require(len(files) <= MAX_FRAMES, f"--frames {folder} holds {len(files)} frames; at most "
                                      f"{MAX_FRAMES}: keep every n-th frame, or a shorter clip")
    return files


def video_frames(path: Path) -> tuple[list[torch.Tensor], float | None]:
    """(frames (3, H, W) uint8, frames per second or None) of a video file: an animated GIF,
    PNG or WebP through PIL; any other through torchvision.io.read_video, where this torchvision
    has it."""
    try:
        data.regular_file(path, "video", 2 ** 30)
    except OSError:
        raise DinoError(f"--video {path} does not exist or is not a file") from None
    if path.suffix.lower() in (".gif", ".png", ".webp"):
        try:
            with data.open_image(path) as im:
                count = getattr(im, "n_frames", 1)
                require(count <= MAX_FRAMES, f"--video {path} has {count} frames; at most {MAX_FRAMES}")
                frames, durations = [], []
                for i in range(count):
                    im.seek(i)
                    frames.append(torch.as_tensor(np.array(im.convert("RGB"))).permute(2, 0, 1))
                    durations.append(im.info.get("duration") or 0)
        except data.UNREADABLE:
            raise DinoError(f"--video {path} could not be read (not an image, or damaged)") from None
        mean = sum(durations) / len(durations)
        return frames, 1000 / mean if mean > 0 else None
    read_video = getattr(torchvision.io, "read_video", None)
    require(read_video is not None, f"--video {path}: this torchvision ({torchvision.__version__}) "
                                    f"cannot decode video files (no torchvision.io.read_video); cut "
                                    f"it into frames (ffmpeg -i {path} frames/%05d.png) and pass "
                                    f"--frames frames")
    try:
        frames, _, info = read_video(str(path), pts_unit="sec", output_format="TCHW")
    except Exception as e:
        raise DinoError(f"--video {path} could not be decoded ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'no message'})") from None
    require(len(frames) > 0, f"--video {path} holds no frames")
    require(len(frames) <= MAX_FRAMES, f"--video {path} has {len(frames)} frames; at most {MAX_FRAMES}")
    return list(frames), info.get("video_fps")


def overlay(drawn: dict, head: int, alpha: float = 0.55) -> torch.Tensor:
    """The image of attention_of's result with one head's attention (head k, or 0: the mean of
    heads) over it in inferno colours, (H, W, 3) uint8."""
    x = rearrange(drawn["x"], "c h w -> h w c")
    heat_map = heat(upsample(drawn["maps"][head - 1 if head else -1], drawn["patch"])).float() / 255
    return (255 * ((1 - alpha) * x + alpha * heat_map)).round().clamp(0, 255).to(torch.uint8)


def write_animation(frames: list[torch.Tensor], path: Path, fps: float):
    """(H, W, 3) uint8 frames as an animated GIF (PIL), or an MP4 (torchvision.io.write_video).
    PIL's GIF writer merges a frame equal to the one before, so such a frame has one pixel
    inverted: the GIF keeps one frame per input frame."""
    if path.suffix.lower() == ".mp4":
        torchvision.io.write_video(str(path), torch.stack(frames), fps=fps)
        return
    pictures, before = [], None
    for f in frames:
        if before is not None and torch.equal(f, before):
            f = f.clone()
            f[0, 0] = 255 - f[0, 0]
        pictures.append(Image.fromarray(f.numpy()))
        before = f
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=round(1000 / fps),
                     loop=0)


def check_video_out(path: Path):
    """A one-line error, before any work, for an output the video command cannot write."""
    suffix = path.suffix.lower()
    require(suffix in (".gif", ".mp4"), f"--out {path}: give a .gif or .mp4 file name")
    require(suffix == ".gif" or hasattr(torchvision.io, "write_video"),
            f"--out {path}: this torchvision ({torchvision.__version__}) cannot write MP4 (no "
            f"torchvision.io.write_video); use --out {path.with_suffix('.gif')}")


def run_video(args):
    require(bool(args.frames) != bool(args.video), "give --frames DIR or --video FILE (one of them)")
    source = Path(args.frames or args.video).expanduser()
    if args.out:
        check_video_out(Path(args.out))
    backbone, _ = model_and_out(dict_without(args, "out"))
    path = Path(args.out) if args.out else (Path(args.checkpoint or args.pretrained).parent
                                           / f"attention_{source.stem or 'video'}.gif")
    heads = backbone.num_heads
    require(args.head <= heads, f"--head {args.head}: the model has {heads} heads (1 to {heads}; "
                                f"0: their mean)")
    p = backbone.patch_size
    size, note = resolution_for(p, args.resolution)
    if note:
        print(note)
    if args.frames:
        frames, fps = frame_files(source), None
    else:
        frames, fps = video_frames(source)
    fps = args.fps or fps or 10
    drawn, shape = [], None
    for frame in tqdm(frames, desc="frames", unit="frame", disable=len(frames) < 2, leave=False):
        name = frame if isinstance(frame, Path) else f"frame {len(drawn) + 1}"
        image = read_image(frame) if isinstance(frame, Path) else frame
        image, _, _ = cut_to_tokens(image, p, size)
        picture = overlay(attention_of(backbone, image, 0.6, size), args.head)
        shape = shape or picture.shape
        require(picture.shape == shape, f"{name} is {image.shape[-1]}x{image.shape[-2]} px, unlike "
                                        f"the first frame; the frames of a video share one size")
        drawn.append(picture)
    write_animation(drawn, path, fps)
    print(f"{len(drawn)} frames, {'mean of heads' if not args.head else f'head {args.head}'}, "
          f"{shape[1]}x{shape[0]} px, {fps:g} frames per second")
    return [path]


def dict_without(args, name: str) -> argparse.Namespace:
    """args with `name` set to None."""
    return argparse.Namespace(**{**vars(args), name: None})


def in_memory(image: torch.Tensor) -> data.ImageSet:
    """One (3, H, W) uint8 image as a data set of dino.py."""
    return data.ImageSet(labels=torch.zeros(1, dtype=torch.long), classes=["sample"],
                         images=image[None])


def run_readme_figures(args):
    """The README's four pictures from one run of dino.py: its teacher's attention and patch
    features on held-out shapes, its log, and the views its settings cut from one image."""
    run = Path(args.run)
    out = Path(args.out) if args.out else Path("assets")
    run_checkpoint = run / "checkpoint.pth"
    backbone = checkpoint.load_backbone(run_checkpoint, num_heads=args.num_heads)
    size = backbone.img_size
    trained_on = config_from_checkpoint(run_checkpoint).data
    held_out = sample_set(args.samples, size, trained_on if trained_on in data.BUILT_IN else "shapes")
    samples = list(held_out.images)
    written = [out / "attention.png", out / "pca.png", out / "curves.png", out / "views.png"]
    attention_figure(backbone, samples[0], args.share, size, path=written[0],
                     mask=None if held_out.masks is None else held_out.masks[0])
    pca_figure(backbone, samples, size, path=written[1])
    records, steps = read_run(run)
    curves_figure(records, title=f"{run}: training curves", path=written[2], steps=steps)
    # the views of the image whose attention is drawn, cut as this run's training cut them
    views_figure(*make_views(in_memory(samples[0]), 0, config_from_checkpoint(run_checkpoint)),
                 path=written[3])
    return written


def model_flags(p, default_images="held-out images of a built-in set"):
    """The flags of the commands that draw a network: its weights, the images, the output."""
    p.add_argument("--checkpoint", help="checkpoint.pth of dino.py (its teacher is drawn)")
    p.add_argument("--pretrained", "--pretrained_weights", help="ViT weights in the authors' format "
                   "(plain backbone dict or full checkpoint); size and patch read from them")
    p.add_argument("--image", "--image_path", action="append",
                   help="image file, folder (every image in it, any depth, sorted) or quoted "
                        "pattern ('photos/*.jpg'); repeat for several; at most 64 images "
                        f"(default: {default_images})")
    p.add_argument("--image_size", type=int, default=0,
                   help="shorter side in px before cropping to a multiple of the patch "
                        "(default: the model's training size)")
    p.add_argument("--out", "--output_dir", help="output folder (default: next to the checkpoint)")
    p.add_argument("--num_heads", type=int, help="heads per block, for a width not in vit.ARCHS")


def attention_flags(p):
    model_flags(p, "images of the evaluation split of the checkpoint's own data")
    p.add_argument("--mask", action="append", help="ground-truth mask of the image of the same "
                                                   "position (nonzero = foreground): its outline and "
                                                   "each head's Jaccard are drawn; found without it "
                                                   "at ROOT/masks/<image path under ROOT>.png, ROOT "
                                                   "the folder given or the image's")
    p.add_argument("--random_init", action="store_true",
                   help="an untrained ViT of the size of --checkpoint/--pretrained (the baseline)")
    p.add_argument("--share", "--threshold", type=float, default=0.6,
                   help="mask keeps this share of each head's attention mass (paper Figure 3: 0.6)")
    p.add_argument("--heads", action="store_true",
                   help="also write OUT/<image>/image.png, attn-head<k>.png, mask-head<k>.png (255 "
                        "inside the mask), attn-mean.png and mask-mean.png at --resolution")
    p.add_argument("--resolution", type=int, default=0,
                   help=f"shorter side in px at which attention is drawn, as the authors' "
                        f"visualize_attention.py (default with --heads: {RESOLUTION}); longer sides "
                        f"are cropped to stay within {data.MAX_PATCHES} patches")
    p.add_argument("--samples", type=int, default=1,
                   help="without --image: how many images of the checkpoint's evaluation split")


def video_flags(p):
    p.add_argument("--checkpoint", help="checkpoint.pth of dino.py (its teacher is drawn)")
    p.add_argument("--pretrained", "--pretrained_weights", help="ViT weights in the authors' format")
    p.add_argument("--num_heads", type=int, help="heads per block, for a width not in vit.ARCHS")
    p.add_argument("--frames", help=f"folder of frames, in name order (at most {MAX_FRAMES})")
    p.add_argument("--video", help=f"video file (at most {MAX_FRAMES} frames): an animated GIF, or "
                                   f"what torchvision.io.read_video decodes, where it exists")
    p.add_argument("--head", type=int, default=0, help="head drawn, from 1 (default 0: the mean of heads)")
    p.add_argument("--resolution", type=int, default=0,
                   help=f"shorter side of the frames in px (default {RESOLUTION}, lowered to fit "
                        f"{data.MAX_PATCHES} patches)")
    p.add_argument("--fps", type=int, default=0,
                   help="frames per second of the output (default: the video's, else 10)")
    p.add_argument("--out", help="output .gif, or .mp4 where torchvision.io.write_video exists "
                                 "(default: attention_<name>.gif beside the weights)")


def run_figure_flags(commands):
    """The commands that draw a run's records or its settings: curves, knn-minutes, views,
    readme-figures."""
    p = commands.add_parser("curves", help="loss, entropy, KL, k-NN and schedules from log.jsonl "
                                           "and steps.jsonl")
    p.add_argument("--run", required=True, help="the --output_dir of a dino.py run")
    p.add_argument("--out", help="output folder (default: the run folder)")
    p = commands.add_parser("knn-minutes", help="k-NN top-1 against minutes of training, from "
                                                "log.jsonl, beside baselines")
    p.add_argument("--run", action="append", required=True, help="the --output_dir of a dino.py "
                                                                 "run with --knn_every; repeat for several")
    p.add_argument("--baseline", action="append", help="LABEL=PERCENT drawn as a dashed line, e.g. "
                                                       "'raw pixels=45.8'; repeat for several")
    p.add_argument("--title", default="")
    p.add_argument("--out", help="output folder (default: the first run folder)")
    p = commands.add_parser("views", help="one image and its multi-crop views")
    p.add_argument("--data", help="as dino.py --data (default: a built-in shapes sample)")
    p.add_argument("--image", help="one image file instead of --data")
    p.add_argument("--index", type=int, default=0, help="which training image of --data")
    p.add_argument("--checkpoint", help="take crop sizes and counts from this run's config")
    p.add_argument("--seed", type=int, default=0, help="seed of the random crops and colours")
    p.add_argument("--out", help=f"output folder (default: {DEFAULT_OUT})")
    p = commands.add_parser("readme-figures", help="the README's four pictures from one run")
    p.add_argument("--run", required=True, help="the --output_dir of a dino.py run")
    p.add_argument("--out", help="output folder (default: assets)")
    p.add_argument("--share", type=float, default=0.6)
    p.add_argument("--samples", type=int, default=6)
    p.add_argument("--num_heads", type=int, help="heads per block, for a width not in vit.ARCHS")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    attention_flags(commands.add_parser("attention", help="per-head [CLS] attention maps and masks, "
                                                          "one PNG per image"))
    video_flags(commands.add_parser("video", help="one head's attention over every frame of a clip, "
                                                  "as an animated GIF (or MP4)"))
    p = commands.add_parser("pca", help="first 3 principal components of patch features as RGB")
    model_flags(p)
    p.add_argument("--samples", type=int, default=6, help="built-in samples when no --image")
    run_figure_flags(commands)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    rules = dict(samples="panels", share="(0,1)", image_size="side>=0", num_heads=">=1", index=">=0",
                 seed="seed", resolution="side>=0", head="[0,64]")
    for name, rule in rules.items():  # data.RULES, as dino.py's and knn_eval.py's flags use
        if getattr(args, name, None) is not None:
            data.check_flag(name, getattr(args, name), rule)
    images = getattr(args, "image", None)
    require(not isinstance(images, list) or len(images) <= 64,  # as --samples: "panels"
            f"{len(images or [])} --image files given; at most 64 (a figure panel or a PNG each)")
    fps = getattr(args, "fps", 0)
    require(0 <= fps <= 60, f"--fps must be at least 1 and at most 60 (0: the video's), got {fps}")
    if getattr(args, "out", None):  # before any model or data is loaded
        (data.writable_file if args.command == "video" else data.writable_folder)(args.out, "--out")
    run = {"attention": run_attention, "pca": run_pca, "curves": run_curves, "views": run_views,
           "video": run_video,
           "knn-minutes": run_knn_minutes,
           "readme-figures": run_readme_figures}[args.command]
    for path in run(args):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DinoError as e:
        sys.exit(f"error: {e}")
