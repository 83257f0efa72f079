"""Pictures of what DINO learns: attention maps, PCA of patch features, training curves, views.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021: Figure 1
and Figure 3 show the last block's [CLS] attention per head, which segments objects without
any label; Figure 7 shows the teacher's entropy and KL(P_t ‖ P_s) over training.

Every figure is a function that returns a matplotlib Figure (and saves it when given a path),
so notebooks call the same code as the command line. Figures are drawn with matplotlib's
object-oriented API (no pyplot), rendered to PNG by the Agg backend: no display is needed.

Run:  python visualize.py attention --checkpoint runs/shapes/checkpoint.pth   (built-in sample)
      python visualize.py attention --pretrained dino_deitsmall16_pretrain.pth --image cat.jpg
      python visualize.py pca --checkpoint runs/shapes/checkpoint.pth
      python visualize.py curves --run runs/shapes
      python visualize.py views                  (or --data ./cifar10 --index 7, or --image cat.jpg)
      python visualize.py readme-figures --run runs/shapes     (all of the above into assets/)
"""

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

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


def attention_figure(backbone: vit.VisionTransformer, image: torch.Tensor, share: float = 0.6,
                     size: int | None = None, title: str = "", path=None,
                     mask: torch.Tensor | None = None) -> Figure:
    """Top row: the image, each head's [CLS] attention, their mean. Bottom row: the masks that
    keep `share` of each map's mass (knn_eval.attention_mask), drawn over the image (dimmed
    outside the mask). With a ground-truth mask (H, W) bool of the image, its outline is drawn
    in cyan on the image and the masks, and each mask's Jaccard with it (knn_eval.jaccard) is
    written under it.

    image: (3, H, W) uint8 of any size; `size` px on its shorter side (None: the training size).
    """
    p = backbone.patch_size
    x = fit_to_patches(image, p, size or backbone.img_size)
    if mask is not None:  # cut and resized as the image: its 0/255 picture, back to 0/1
        mask = fit_to_patches((255 * mask.to(torch.uint8)).expand(3, -1, -1), p,
                              size or backbone.img_size)[0] > 0.5
    maps = attention_maps(backbone, x)  # (heads, gh, gw)
    maps = torch.cat([maps, maps.mean(0, keepdim=True)])  # (heads + 1, gh, gw): the mean last
    masks = rearrange(attention_mask(rearrange(maps, "m gh gw -> m (gh gw)"), share),
                      "m (gh gw) -> m gh gw", gh=maps.shape[1])
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
    counted), one line per run ({label: epoch records}), baselines ({label: top-1}) dashed."""
    fig = Figure(figsize=(6.4, 4), dpi=100, layout="constrained")
    ax = fig.subplots()
    for label, records in runs.items():
        minutes = itertools.accumulate(r["seconds"] / 60 for r in records)
        points = [(m, r["knn_top1"]) for m, r in zip(minutes, records) if "knn_top1" in r]
        require(points, f"{label}: no k-NN in its log.jsonl (dino.py --knn_every N)")
        ax.plot(*zip(*points), "o-", markersize=4, label=label)
        ax.annotate(f"{points[-1][1]:.1f}%", points[-1], textcoords="offset points", xytext=(4, -10),
                    fontsize=8)
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


def run_attention(args):
    backbone, out = model_and_out(args)
    size = args.image_size or backbone.img_size
    require(not args.mask or len(args.mask) == len(args.image or []),
            "give one --mask per --image, in the same order")
    if args.image:
        masks = [data.read_mask(m) for m in args.mask] if args.mask else [None] * len(args.image)
        images = [(Path(f).stem, read_image(f), m) for f, m in zip(args.image, masks)]
        for f, m, (_, image, mask) in zip(args.image, args.mask or [], images):  # as data.with_masks
            data.require_mask_fits(m, mask.shape[::-1], f, image.shape[:-3:-1])
    else:
        sample = sample_set(1, size, built_in_of(args))
        images = [("sample", sample.images[0], None if sample.masks is None else sample.masks[0])]
    written = []
    for stem, image, mask in images:
        path = out / f"attention_{stem}.png"
        attention_figure(backbone, image, args.share, size, path=path, mask=mask)
        written.append(path)
    return written


def run_pca(args):
    backbone, out = model_and_out(args)
    size = args.image_size or backbone.img_size
    images = ([read_image(f) for f in args.image] if args.image
              else sample_images(args.samples, size, built_in_of(args)))
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


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def model_flags(p):
        p.add_argument("--checkpoint", help="checkpoint.pth of dino.py (its teacher is drawn)")
        p.add_argument("--pretrained", "--pretrained_weights", help="ViT weights in the authors' format (plain backbone "
                                            "dict or full checkpoint); size and patch read from them")
        p.add_argument("--image", "--image_path", action="append", help="image file; repeat for several "
                                                        "(default: built-in shapes samples)")
        p.add_argument("--image_size", type=int, default=0,
                       help="shorter side in px before cropping to a multiple of the patch "
                            "(default: the model's training size)")
        p.add_argument("--out", "--output_dir", help="output folder (default: next to the checkpoint)")
        p.add_argument("--num_heads", type=int, help="heads per block, for a width not in vit.ARCHS")

    p = commands.add_parser("attention", help="per-head [CLS] attention maps and masks, one PNG per image")
    model_flags(p)
    p.add_argument("--mask", action="append", help="ground-truth mask of the --image of the same "
                                                   "position (nonzero = foreground): its outline and "
                                                   "each head's Jaccard are drawn")
    p.add_argument("--random_init", action="store_true",
                   help="an untrained ViT of the size of --checkpoint/--pretrained (the baseline)")
    p.add_argument("--share", "--threshold", type=float, default=0.6,
                   help="mask keeps this share of each head's attention mass (paper Figure 3: 0.6)")
    p = commands.add_parser("pca", help="first 3 principal components of patch features as RGB")
    model_flags(p)
    p.add_argument("--samples", type=int, default=6, help="built-in samples when no --image")
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
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    rules = dict(samples="panels", share="(0,1)", image_size="side>=0", num_heads=">=1", index=">=0",
                 seed="seed")
    for name, rule in rules.items():  # data.RULES, as dino.py's and knn_eval.py's flags use
        if getattr(args, name, None) is not None:
            data.check_flag(name, getattr(args, name), rule)
    images = getattr(args, "image", None)
    require(not isinstance(images, list) or len(images) <= 64,  # as --samples: "panels"
            f"{len(images or [])} --image files given; at most 64 (a figure panel or a PNG each)")
    if getattr(args, "out", None):  # before any model or data is loaded
        data.writable_folder(args.out, "--out")
    run = {"attention": run_attention, "pca": run_pca, "curves": run_curves, "views": run_views,
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
