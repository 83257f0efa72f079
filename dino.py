"""DINO: self-distillation with no labels, in one file that follows the paper.

Caron, Touvron, Misra, Jégou, Mairal, Bojanowski, Joulin. "Emerging Properties in
Self-Supervised Vision Transformers", ICCV 2021, arXiv:2104.14294. Authors' code:
github.com/facebookresearch/dino. Where this file knowingly differs from that code, a comment says so.

A student network g_θs and a teacher g_θt (same architecture, a ViT backbone plus a projection
head) each turn an image view into a probability distribution over K dimensions. The student
sees 2 global and several local views of an image, the teacher only the 2 global ones, and the
student learns to predict the teacher's distribution for every other view. The teacher is an
exponential moving average of the student; centering and sharpening its output keep the two
from collapsing to a constant.

The file reads in the paper's order:
  0. hyperparameters            4. teacher EMA
  1. data                       5. schedules
  2. multi-crop augmentation    6. training loop (+ checkpoints, log, k-NN monitor)
  3. head and loss              7. command line

Run:  python dino.py                      (built-in `shapes` data set, ~5 minutes on a laptop CPU)
      python dino.py --data ./cifar10     (CIFAR-10, downloaded there if missing)
"""

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import pickle
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import vit
from knn_eval import extract_features, knn_accuracy


class DinoError(Exception):
    """A problem with the user's input; the command line prints its message on one line."""


# ------------------------------------------------------------------------------------------------
# 0. Hyperparameters. The defaults are the paper's ImageNet values (tests/test_dino.py pins them);
#    `preset_for()` swaps in sizes that suit small images. Every field is a command-line flag.
# ------------------------------------------------------------------------------------------------

def knob(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    data: str = knob("shapes", "'shapes' (built in, no files), a CIFAR-10 folder, or an image "
                               "folder with train/<class>/ and val/ or test/")
    output_dir: str = knob("", "where checkpoint.pth and log.jsonl go (default: runs/<data name>)")
    # backbone
    arch: str = knob("vit_small", "backbone: vit_nano | vit_tiny | vit_small | vit_base")
    patch_size: int = knob(16, "ViT patch size p in pixels")
    drop_path_rate: float = knob(0.1, "stochastic depth of the student (the teacher has none)")
    # projection head g = last_layer ∘ normalize ∘ MLP
    out_dim: int = knob(65536, "K, the number of output dimensions; smaller (4096) for small data")
    hidden_dim: int = knob(2048, "width of the head's hidden layers")
    bottleneck_dim: int = knob(256, "width of the L2-normalised bottleneck")
    norm_last_layer: bool = knob(True, "fix the norm of the last layer's weights to 1 (stabler)")
    use_bn_in_head: bool = knob(False, "BatchNorm after the head's hidden layers")
    # loss: temperatures and centering
    student_temp: float = knob(0.1, "τ_s, student temperature")
    warmup_teacher_temp: float = knob(0.04, "τ_t at the start of its linear warm-up")
    teacher_temp: float = knob(0.07, "τ_t after warm-up (paper: 0.04 → 0.07 over 30 epochs; "
                                     "the authors' code defaults to 0.04). Above 0.07 is unstable; "
                                     "set it to τ_s to turn sharpening off")
    warmup_teacher_temp_epochs: int = knob(30, "epochs of τ_t warm-up")
    center_momentum: float = knob(0.9, "m, momentum of the center c")
    centering: bool = knob(True, "subtract the center c from the teacher's output "
                                 "(--no_centering for the collapse ablation)")
    # teacher
    momentum_teacher: float = knob(0.996, "λ at step 0, raised to 1 on a cosine; raise it "
                                          "(0.9995) for small batches, 0 copies the student")
    # multi-crop
    global_crops_size: int = knob(224, "side of the 2 global views, px")
    global_crops_scale: tuple = knob((0.4, 1.0), "area range of a global crop, share of the image")
    local_crops_number: int = knob(8, "number of local views")
    local_crops_size: int = knob(96, "side of a local view, px")
    local_crops_scale: tuple = knob((0.05, 0.4), "area range of a local crop, share of the image")
    # optimisation
    optimizer: str = knob("adamw", "adamw | sgd")
    batch_size: int = knob(64, "images per step (per process)")
    epochs: int = knob(100, "training epochs")
    lr: float = knob(0.0005, "peak learning rate at batch 256; scaled linearly with the batch")
    min_lr: float = knob(1e-6, "learning rate at the end of the cosine decay")
    warmup_epochs: int = knob(10, "epochs of linear lr warm-up from 0")
    weight_decay: float = knob(0.04, "weight decay at step 0, raised on a cosine ...")
    weight_decay_end: float = knob(0.4, "... to this value at the last step")
    clip_grad: float = knob(3.0, "clip each parameter's gradient to this norm (0 = off)")
    freeze_last_layer: int = knob(1, "epochs during which the head's last layer is not updated; "
                                     "raise it if the loss does not fall")
    # run
    seed: int = knob(0, "random seed")
    device: str = knob("auto", "auto | cpu | cuda | cuda:N")
    num_workers: int = knob(4, "data-loading processes for image folders")
    strict_data: bool = knob(False, "stop with an error naming the first unreadable image "
                                    "(default: skip it, name it in log.jsonl, train on the rest)")
    save_every: int = knob(200, "also save the checkpoint every N steps inside an epoch, so a "
                                "killed run resumes where it was (0 = at epoch ends only)")
    knn_every: int = knob(0, "run the k-NN monitor every N epochs (0 = only at the end)")
    precision: str = knob("auto", "auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32")
    compile: bool = knob(False, "torch.compile the networks (same loss as eager within "
                                "tolerance; the first steps are slow while it compiles)")
    time_limit: float = knob(0.0, "stop training after this many minutes, at an epoch boundary "
                                  "(0 = no limit)")


def preset_for(image_size: int, name: str, gpu: bool = False) -> dict:
    """Sizes for small images, applied under the flags the user gave explicitly.

    The paper's values are for 224 px ImageNet photos. On 32 px images a 16 px patch would leave
    4 tokens, so we use 4 px patches, 32 px global and 16 px local crops, and a smaller K.
    On a GPU the batch is larger (512: a ViT-tiny step is too small to fill the GPU at 64).
    """
    if image_size > 64:
        return {}
    preset = dict(patch_size=4, global_crops_size=32, local_crops_size=16,
                  global_crops_scale=(0.25, 1.0), local_crops_scale=(0.05, 0.25),
                  arch="vit_tiny", out_dim=4096, hidden_dim=2048, bottleneck_dim=256,
                  local_crops_number=6, batch_size=512 if gpu else 256, epochs=100)
    if name == "shapes":
        # The built-in set: a model and schedule sized for ~5 minutes on a 2-core CPU (4 epochs of
        # 312 steps). Where we knowingly differ from the authors' ViT recipe, for runs this short
        # (k-NN top-1 of 5-epoch runs unless noted; raw pixels give 22.3 %):
        # - τ_t stays at 0.04: warming it to 0.07 drifted towards the uniform collapse;
        # - BatchNorm in the head (the authors use it for ResNets, not ViTs): without it the
        #   k-NN stayed near raw pixels (19.6 % against 27.3 % with it, batch 128, 4 epochs);
        # - λ starts at 0.98 and the lr decays only to 5e-4: the cosine to λ = 1 otherwise
        #   freezes the teacher for the last epochs, and the k-NN stalls there (30.3 % at λ = 0.99,
        #   32.3 % at 0.98, batch 128);
        # - batches of 32 images (the authors use 1024): at the same lr per image (0.001 after the
        #   linear scaling rule), more and smaller steps learn more in the same time: batch 128
        #   reached 32.3 %, batch 64 37.4 %, batch 32 41.2 % (41.3 % in 4 epochs, hence 4).
        preset.update(arch="vit_nano", out_dim=1024, hidden_dim=512, bottleneck_dim=128,
                      local_crops_number=4, batch_size=32, epochs=4, warmup_epochs=1,
                      teacher_temp=0.04, warmup_teacher_temp_epochs=0, momentum_teacher=0.98,
                      lr=0.008, min_lr=0.0005, use_bn_in_head=True, drop_path_rate=0.0,
                      weight_decay_end=0.1)
    return preset


# ------------------------------------------------------------------------------------------------
# 1. Data. Three sources: the built-in `shapes` set, CIFAR-10 (python-pickle layout), and an
#    image folder (train/<class>/*). The first two are held in memory as uint8 tensors.
# ------------------------------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the authors normalise every data set with these
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


@dataclass
class ImageSet:
    """One split: labels, class names, and either the pixels (in memory) or the image files."""
    labels: torch.Tensor                  # (N,) int64
    classes: list
    images: torch.Tensor | None = None    # (N, 3, H, W) uint8, when held in memory
    files: list | None = None             # paths, when read from a folder
    skipped: list = field(default_factory=list)  # files that could not be read

    def __len__(self):
        return len(self.labels)


SHAPES = ["disk", "ring", "square", "frame", "triangle", "cross", "star", "bar"]


def shape_mask(shape: str, u, v):
    """Inside-test of a shape of radius 1 in its own frame (u, v)."""
    rho, phi = (u ** 2 + v ** 2).sqrt(), torch.atan2(v, u)
    box = torch.maximum(u.abs(), v.abs())
    if shape == "disk":
        return rho <= 1.0
    if shape == "ring":
        return (rho <= 1.0) & (rho >= 0.6)
    if shape == "square":
        return box <= 0.8
    if shape == "frame":
        return (box <= 0.85) & (box >= 0.5)
    if shape == "triangle":
        return (v >= -0.5) & (v <= 1.0 - 1.732 * u.abs())
    if shape == "cross":
        return ((u.abs() <= 0.3) | (v.abs() <= 0.3)) & (box <= 1.0)
    if shape == "star":
        return rho <= 0.45 + 0.55 * ((torch.cos(5 * phi) + 1) / 2) ** 2
    return (u.abs() <= 1.0) & (v.abs() <= 0.28)  # bar


def make_shapes(n: int, seed: int, size: int = 32, gray: bool = True) -> ImageSet:
    """The built-in data set: each image is a lattice of one of 8 shapes, in shades of gray.

    The lattice's period (7-11 px), rotation and offset, the shapes' size, the shading (a
    gradient in a random direction) and the two gray levels are random and independent of the
    class, so raw pixels say little about it (k-NN 22 %), while every crop, even a small local
    one, shows the class: multi-crop's local-to-global matching has something to learn. Gray,
    because with random colours a few hundred steps of DINO learn to match views by colour
    (colour is shared by all crops of an image) and never reach the shapes. Deterministic for a
    seed; drawn 1000 images at a time so memory stays small. gray=False keeps the colours (the
    same lattices): the collapse notebooks' fast mode uses it, since colours make the untrained
    network's outputs differ from image to image, and the centering/sharpening balance shows
    within its 120 steps.
    """
    g = torch.Generator().manual_seed(seed)
    parts = [draw_shapes(min(1000, n - start), g, size, gray) for start in range(0, n, 1000)]
    return ImageSet(labels=torch.cat([p[1] for p in parts]), classes=list(SHAPES),
                    images=torch.cat([p[0] for p in parts]))


def draw_shapes(n: int, g: torch.Generator, size: int, gray: bool = True):
    u01 = lambda *shape: torch.rand(*shape, generator=g)
    label = torch.randint(len(SHAPES), (n,), generator=g)
    ss = 2 * size  # draw at twice the size, then average 2x2 pixels (anti-aliasing)
    coords = (torch.arange(ss) + 0.5) / ss  # pixel centres in [0, 1]
    y, x = coords[:, None], coords[None, :]
    # background: a linear gradient between two random colours in a random direction
    bg_a, bg_b = u01(n, 3, 1, 1), u01(n, 3, 1, 1)
    angle = u01(n, 1, 1) * 2 * math.pi
    ramp = ((x - 0.5) * torch.cos(angle) + (y - 0.5) * torch.sin(angle) + 0.5).clamp(0, 1)
    background = bg_a + (bg_b - bg_a) * ramp[:, None]  # (n, 3, ss, ss)
    # foreground colour at least 0.35 away (RMS over RGB) from the background's mean colour
    fg = u01(n, 3, 1, 1)
    bg_mean = (bg_a + bg_b) / 2
    for _ in range(20):
        close = ((fg - bg_mean).pow(2).mean(1, keepdim=True).sqrt() < 0.35).expand_as(fg)
        fg = torch.where(close, u01(n, 3, 1, 1), fg)
    # the lattice: period T (share of the side), shape radius r, rotation, offset (o_x, o_y)
    period = (7 + 4 * u01(n, 1, 1)) / size
    r = period * (0.36 + 0.08 * u01(n, 1, 1))
    rot = u01(n, 1, 1) * 2 * math.pi
    ox, oy = u01(n, 1, 1), u01(n, 1, 1)
    # lattice coordinates (a, b) = R(rot) (x - o) / T; each cell's own frame (u, v) in radii
    a = ((x - ox) * torch.cos(rot) + (y - oy) * torch.sin(rot)) / period  # (n, ss, ss)
    b = (-(x - ox) * torch.sin(rot) + (y - oy) * torch.cos(rot)) / period
    u = (a - a.floor() - 0.5) * period / r
    v = (b - b.floor() - 0.5) * period / r
    mask = torch.zeros(n, 1, ss, ss)
    for k in range(len(SHAPES)):
        i = label == k
        mask[i] = shape_mask(SHAPES[k], u[i], v[i]).unsqueeze(1).float()
    img = background * (1 - mask) + fg * mask
    img = img + 0.03 * torch.randn(img.shape, generator=g)  # sensor noise
    img = F.avg_pool2d(img, 2)  # (n, 3, size, size)
    img = (img.clamp(0, 1) * 255).round()
    if gray:  # shades of gray: the colours' channel mean
        img = img.mean(1, keepdim=True).round().expand(-1, 3, -1, -1)
    return img.to(torch.uint8).contiguous(), label  # (n, 3, size, size), (n,)


def load_cifar10(root: Path) -> tuple[ImageSet, ImageSet]:
    """Read CIFAR-10's python pickles directly (torchvision's class rejects copies by md5)."""
    base = root / "cifar-10-batches-py"
    classes = pickle.load(open(base / "batches.meta", "rb"), encoding="latin1")["label_names"]

    def read(names):
        images, labels = [], []
        for name in names:
            with open(base / name, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            images.append(torch.as_tensor(batch["data"]))
            labels += batch["labels"]
        # each row holds 1024 red, 1024 green, then 1024 blue values, row-major
        images = rearrange(torch.cat(images), "n (c h w) -> n c h w", c=3, h=32, w=32)
        return ImageSet(labels=torch.tensor(labels), classes=classes, images=images.contiguous())

    return read([f"data_batch_{i}" for i in range(1, 6)]), read(["test_batch"])


def download_cifar10(root: Path):
    try:
        import torchvision
        torchvision.datasets.CIFAR10(root=str(root), train=True, download=True)
    except Exception as e:  # no network, a proxy, a full disk: all end the same way for the user
        raise DinoError(
            f"CIFAR-10 is not in {root} and downloading it failed ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'no message'}); download "
            f"cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and "
            f"extract it into {root}") from None


def unreadable(path) -> DinoError:
    return DinoError(f"{path} could not be read as an image; remove or replace it, or run "
                     f"without --strict_data to skip unreadable files")


def scan_folder(split_dir: Path, classes: list | None = None, strict: bool = False) -> ImageSet:
    class_dirs = sorted(d for d in split_dir.iterdir() if d.is_dir())
    if not class_dirs:
        raise DinoError(f"{split_dir} has no class folders; expected {split_dir}/<class>/<image>")
    classes = classes or [d.name for d in class_dirs]
    files, labels, empty = [], [], []
    for d in class_dirs:
        if d.name not in classes:
            raise DinoError(f"class folder {d} is not among the training classes")
        for f in sorted(d.iterdir()):
            if f.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            if f.stat().st_size == 0:  # an interrupted copy or download: skipped, and named in the log
                if strict:
                    raise unreadable(f)
                empty.append(str(f))
                continue
            files.append(str(f))
            labels.append(classes.index(d.name))
    if not files:
        raise DinoError(f"no images found under {split_dir} (looked for "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
    return ImageSet(labels=torch.tensor(labels), classes=classes, files=files, skipped=empty)


def load_data(path: str, strict: bool = False) -> tuple[str, ImageSet, ImageSet | None]:
    """Return (name, train split, evaluation split or None) for any supported --data."""
    if path == "shapes":
        return "shapes", make_shapes(10_000, seed=0), make_shapes(2_000, seed=1)
    root = Path(path).expanduser()
    looks_like_cifar = "cifar" in root.name.lower().replace("-", "")
    if (root / "cifar-10-batches-py").is_dir():
        return "cifar10", *load_cifar10(root)
    if looks_like_cifar and (not root.exists() or not any(root.iterdir())):
        download_cifar10(root)
        return "cifar10", *load_cifar10(root)
    if not root.exists():
        raise DinoError(f"data path {root} does not exist; pass --data shapes for the built-in "
                        f"set, a CIFAR-10 folder, or an image folder with train/<class>/")
    if not root.is_dir():
        raise DinoError(f"data path {root} is not a folder")
    if not (root / "train").is_dir():
        raise DinoError(f"{root} has no train/ folder (nor cifar-10-batches-py/); expected "
                        f"{root}/train/<class>/<image> and optionally {root}/val/ or test/")
    train = hold_in_memory(scan_folder(root / "train", strict=strict), strict=strict)
    evaluation = None
    for name in ("val", "test"):
        if (root / name).is_dir():
            evaluation = hold_in_memory(scan_folder(root / name, train.classes, strict), strict=strict)
            break
    return root.name or "images", train, evaluation


def hold_in_memory(data: ImageSet, max_side: int = 64, max_bytes: int = 4 * 2 ** 30,
                   strict: bool = False) -> ImageSet:
    """Decode a folder of small images of one size (e.g. CIFAR-10 as JPEGs) into one uint8
    tensor, so it trains on the fast in-memory path; any other folder stays as files."""
    from concurrent.futures import ThreadPoolExecutor
    try:
        side = probe_image_size(data)
    except DinoError:  # unreadable files: leave them to the per-image path, which reports them
        return data
    if side > max_side or len(data) * 3 * side * side > max_bytes:
        return data
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        images = list(pool.map(read_rgb, data.files, chunksize=256))
    if strict and None in images:
        raise unreadable(data.files[images.index(None)])
    sizes = {im.size for im in images if im is not None}
    if len(sizes) != 1:
        return data  # sizes differ: crop each image on its own, in the DataLoader
    from torchvision.transforms.v2.functional import pil_to_tensor
    keep = [i for i, im in enumerate(images) if im is not None]
    return ImageSet(labels=data.labels[keep], classes=data.classes,
                    images=torch.stack([pil_to_tensor(images[i]) for i in keep]),  # (n, 3, H, W)
                    skipped=data.skipped + [data.files[i] for i, im in enumerate(images) if im is None])


def probe_image_size(data: ImageSet) -> int:
    """The typical shorter side of the images (the median of the first 20 readable ones)."""
    if data.images is not None:
        return min(data.images.shape[-2:])
    from PIL import Image
    sides = []
    for f in data.files[:20]:
        try:
            with Image.open(f) as im:
                sides.append(min(im.size))
        except OSError:
            continue
    if sides:
        return sorted(sides)[len(sides) // 2]
    raise DinoError(f"none of the first images under {Path(data.files[0]).parent.parent} "
                    f"could be read; are they images?")


# ------------------------------------------------------------------------------------------------
# 2. Multi-crop augmentation (paper Section 3.1 and the authors' DataAugmentationDINO).
#    Every view: random resized crop, flip, colour jitter, grayscale, blur, solarize, normalise.
#    The geometry (crop) is done per image for folders of any size, or on whole batches for
#    in-memory data; the photometric part always runs on whole batches with per-image random
#    parameters, on the device the model uses. Both follow this one table.
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ViewSpec:
    flip: float = 0.5       # P(horizontal flip)
    jitter: float = 0.8     # P(colour jitter)
    gray: float = 0.2       # P(grayscale)
    blur: float = 0.0       # P(Gaussian blur)
    solarize: float = 0.0   # P(solarize)


VIEW_SPECS = {
    "global1": ViewSpec(blur=1.0),                  # first global view: always blurred
    "global2": ViewSpec(blur=0.1, solarize=0.2),    # second: rarely blurred, sometimes solarized
    "local": ViewSpec(blur=0.5),                    # every local view
}
JITTER = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)  # ColorJitter strengths
BLUR_SIGMA = (0.1, 2.0)  # px at 224 px; scaled with the crop size so small images are not erased
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # luma weights of torchvision's rgb_to_grayscale


def view_names(n_local: int) -> list[str]:
    return ["global1", "global2"] + ["local"] * n_local


def step_generator(seed: int, epoch: int, step: int, device) -> torch.Generator:
    """The generator of one step's augmentations: a pure function of (seed, epoch, step), so a
    resumed run draws the same views as an uninterrupted one, and on the device, so drawing
    the random parameters never waits for the GPU."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + step)


def sample_crop_boxes(n, height, width, scale, ratio=(3 / 4, 4 / 3), generator=None, tries=10):
    """torchvision's RandomResizedCrop.get_params for n images at once: (n, 4) as (top, left, h, w)."""
    dev = generator.device if generator is not None else "cpu"
    area = height * width
    target = area * torch.empty(n, tries, device=dev).uniform_(*scale, generator=generator)
    log_r = torch.empty(n, tries, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                       generator=generator)
    aspect = torch.exp(log_r)
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.float().argmax(1, keepdim=True)  # first try that fits
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    # fallback when no try fits: the whole image (ratio-clamped), as torchvision does
    none = ~ok.any(1)
    w = torch.where(none, float(min(width, round(height * ratio[1]))), w)
    h = torch.where(none, float(min(height, round(width / ratio[0]))), h)
    top = (torch.rand(n, generator=generator, device=dev) * (height - h + 1)).floor()
    left = (torch.rand(n, generator=generator, device=dev) * (width - w + 1)).floor()
    return torch.stack([top, left, h, w], dim=1)


def sample_view_params(n, height, width, size, scale, spec: "ViewSpec", generator):
    """Every random choice of one view for n images, drawn on the generator's device.

    The one specification both augmentation paths follow: VIEW_SPECS gives the probabilities,
    JITTER the ranges (torchvision's ColorJitter: factors uniform in [1 - s, 1 + s], hue shift
    in [-h, h], the four operations in a random order), BLUR_SIGMA the blur's σ range.
    """
    dev = generator.device
    rand = lambda *shape: torch.rand(*shape, generator=generator, device=dev)
    b, c, s, h = (JITTER[k] for k in ("brightness", "contrast", "saturation", "hue"))
    lo, hi = (sigma * size / 224 for sigma in BLUR_SIGMA)  # σ is given for 224 px views
    return dict(
        box=sample_crop_boxes(n, height, width, scale, generator=generator),  # (n, 4)
        flip=rand(n) < spec.flip,
        jitter=rand(n) < spec.jitter,
        factors=torch.stack([1 - b + 2 * b * rand(n), 1 - c + 2 * c * rand(n),
                             1 - s + 2 * s * rand(n), h * (2 * rand(n) - 1)], dim=1),  # (n, 4)
        order=torch.argsort(rand(n, 4), dim=1),  # jitter operation applied at each of 4 steps
        gray=rand(n) < spec.gray,
        blur=rand(n) < spec.blur,
        sigma=lo + (hi - lo) * rand(n),
        solarize=rand(n) < spec.solarize,
    )


def cubic(x, a=-0.5):
    """The bicubic kernel of PIL (a = -0.5), which torchvision's antialiased resize also uses."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1  # |x| < 1
    far = (((x - 5) * x + 8) * x - 4) * a  # 1 <= |x| < 2
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resize_weights(start, length, out_size, in_size):
    """(n, out_size, in_size) weights that resample the span [start, start + length) of an axis
    to out_size px: PIL's bicubic resize of the cropped image (crop, then resize, as the authors'
    RandomResizedCrop does), with the kernel widened by length / out_size when shrinking."""
    scale = (length / out_size)[:, None, None]  # (n, 1, 1) input px per output px
    widen = scale.clamp(min=1.0)  # antialiasing: a wider kernel when shrinking
    support = 2.0 * widen
    center = (torch.arange(out_size, device=start.device) + 0.5)[None, :, None] * scale  # (n, S, 1)
    j = torch.arange(in_size, device=start.device)[None, None, :] - start[:, None, None]  # crop px
    first = (center - support + 0.5).trunc().clamp(min=0)  # taps in [first, last), inside the crop
    last = torch.minimum((center + support + 0.5).trunc(), length[:, None, None])
    w = cubic((j + 0.5 - center) / widen) * ((j >= first) & (j < last))
    return w / w.sum(-1, keepdim=True)


def crop_resize_flip(images, boxes, flips, size):
    """Crop boxes (n, 4) = (top, left, h, w) out of images (n, 3, H, W), resize each crop to
    size x size (bicubic, antialiased) and flip some horizontally.

    Resizing is separable, so each crop is two small matrix products: out = W_y · x · W_xᵀ.
    For a fixed box this equals torchvision's resized_crop(..., BICUBIC, antialias=True)
    (tested), i.e. PIL's crop + resize up to its rounding to 8 bits.
    """
    n, _, H, W = images.shape
    top, left, h, w = boxes.to(images.device, images.dtype).unbind(1)
    W_y = resize_weights(top, h, size, H)  # (n, S, H)
    W_x = resize_weights(left, w, size, W)  # (n, S, W)
    W_x = torch.where(flips.to(images.device).view(n, 1, 1), W_x.flip(1), W_x)  # mirror the columns
    out = W_y[:, None] @ images @ W_x[:, None].transpose(-1, -2)  # (n, 3, S, S)
    return out.clamp(0, 1)


# The colour operations below follow torchvision's tensor implementations (tests compare them
# pixel for pixel); x is (n, 3, H, W) in [0, 1], factors are (n,), one per image.

def grayscale(x):
    r, g, b = x.unbind(-3)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(-3)


def rgb_to_hsv(x):
    r, g, b = x.unbind(-3)
    maxc, minc = x.max(-3).values, x.min(-3).values
    flat = maxc == minc
    delta = maxc - minc
    s = delta / torch.where(flat, torch.ones_like(maxc), maxc)
    d = torch.where(flat, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc,
                    torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(flat, torch.zeros_like(h), h)
    h = (h / 6.0) % 1.0
    return torch.stack([h, s, maxc], dim=-3)


def hsv_to_rgb(x):
    h, s, v = x.unbind(-3)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p = (v * (1 - s)).clamp(0, 1)
    q = (v * (1 - s * f)).clamp(0, 1)
    t = (v * (1 - s * (1 - f))).clamp(0, 1)
    choices = [torch.stack(c, dim=-3) for c in
               [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]]
    out = torch.zeros_like(choices[0])
    for k, c in enumerate(choices):
        out = torch.where((i == k).unsqueeze(-3), c, out)
    return out


def _per_image(factor):
    return factor.view(-1, 1, 1, 1)


def adjust_brightness(x, factor):
    return (_per_image(factor) * x).clamp(0, 1)


def adjust_contrast(x, factor):
    mean = grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
    return (_per_image(factor) * x + (1 - _per_image(factor)) * mean).clamp(0, 1)


def adjust_saturation(x, factor):
    return (_per_image(factor) * x + (1 - _per_image(factor)) * grayscale(x)).clamp(0, 1)


def adjust_hue(x, shift):
    hsv = rgb_to_hsv(x)
    h = (hsv[:, :1] + _per_image(shift)) % 1.0
    return hsv_to_rgb(torch.cat([h, hsv[:, 1:]], dim=1))


JITTER_OPS = [adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue]


def gaussian_blur(x, sigma, max_sigma):
    """Blur each image with its own σ: separable kernels through a grouped convolution.

    The kernel's radius ceil(3 · max_sigma) is shared by the batch; for one σ this equals
    torchvision's gaussian_blur with kernel size 2 · radius + 1 (reflect padding; tested).
    """
    n, c, H, W = x.shape
    radius = max(1, min(math.ceil(3 * max_sigma), min(H, W) - 1))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    # $$k(i) \propto \exp(-i^2 / 2\sigma^2)$$
    kernel = torch.exp(-offsets[None] ** 2 / (2 * sigma.view(n, 1) ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)  # (n, 2r+1)
    kernel = kernel.repeat_interleave(c, dim=0)  # (n·c, 2r+1): one kernel per channel
    flat = rearrange(x, "n c h w -> 1 (n c) h w")
    flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=n * c)  # along H
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=n * c)  # along W
    return rearrange(flat, "1 (n c) h w -> n c h w", n=n)


def solarize(x, threshold=128 / 255):
    """Invert every value at or above the threshold (PIL's ImageOps.solarize(img, 128))."""
    return torch.where(x >= threshold, 1 - x, x)


def where_images(mask, op, x, *args, select=None):
    """x with op(x, *args) on the images where mask (n,) holds; args are per-image (n, ...).

    On a GPU we compute op for every image and select, so no step waits for the host; on a CPU
    we compute it only for the selected images, which is cheaper there. Both give equal results.
    """
    if select if select is not None else x.is_cuda:
        return torch.where(mask.view(-1, 1, 1, 1), op(x, *args), x)
    if not mask.any():
        return x
    x = x.clone()
    x[mask] = op(x[mask], *(a[mask] for a in args))
    return x


def photometric(x, p: dict):
    """Colour jitter (random order), grayscale, blur, solarize with parameters p; x in [0, 1]."""
    for step in range(4):  # ColorJitter: the four operations in a per-image random order
        for k, op in enumerate(JITTER_OPS):
            x = where_images(p["jitter"] & (p["order"][:, step] == k), op, x, p["factors"][:, k])
    x = where_images(p["gray"], lambda v: grayscale(v).expand(-1, 3, -1, -1), x)
    max_sigma = BLUR_SIGMA[1] * x.shape[-1] / 224
    x = where_images(p["blur"], lambda v, s: gaussian_blur(v, s, max_sigma), x, p["sigma"])
    return where_images(p["solarize"], solarize, x)


def normalize(x):
    mean, std = _mean_std(x.device)
    return (x - mean) / std


@functools.lru_cache(maxsize=None)
def _mean_std(device):  # made once per device: a copy from the host would make the GPU wait
    return (torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1))


def multicrop(images_u8, cfg: Config, generator, batch=None, rows=None):
    """All views of in-memory images (n, 3, H, W) uint8: [2 global, V local], each (n, 3, S, S).

    Views of one size are made together (one batch of 2n global, one of V·n local crops), so a
    step launches few, large operations. Under several processes, pass the global batch size
    as `batch` and this process's `rows`: parameters are drawn for the whole global batch, so
    the views do not depend on how the batch is split.
    """
    x = images_u8.float() / 255
    n, _, H, W = x.shape
    names = view_names(cfg.local_crops_number)
    views = []
    for is_global in (True, False):
        group = [name for name in names if name.startswith("global") == is_global]
        if not group:
            continue
        size = cfg.global_crops_size if is_global else cfg.local_crops_size
        scale = cfg.global_crops_scale if is_global else cfg.local_crops_scale
        params = [sample_view_params(batch or n, H, W, size, scale, VIEW_SPECS[name], generator)
                  for name in group]
        if rows is not None:
            params = [{k: v[rows] for k, v in p.items()} for p in params]
        p = {k: torch.cat([q[k] for q in params]) for k in params[0]}  # (len(group)·n, ...)
        v = crop_resize_flip(x.repeat(len(group), 1, 1, 1), p["box"], p["flip"], size)
        views += list(normalize(photometric(v, p)).split(n))
    return views


def per_image_crops(cfg: Config) -> list:
    """torchvision's RandomResizedCrop for each view, for images of any size (PIL, in workers)."""
    from torchvision.transforms import v2 as T
    crops = []
    for name in view_names(cfg.local_crops_number):
        is_global = name.startswith("global")
        crops.append(T.RandomResizedCrop(
            cfg.global_crops_size if is_global else cfg.local_crops_size,
            scale=cfg.global_crops_scale if is_global else cfg.local_crops_scale,
            interpolation=T.InterpolationMode.BICUBIC, antialias=True))
    return crops


class FolderMultiCrop(torch.utils.data.Dataset):
    """Per-image geometry for image folders. An item is (position in the epoch, image index);
    its crops are drawn from a generator seeded by (seed, epoch, position), so they do not depend
    on the number of workers or processes, nor on where a resumed run picked up. An unreadable
    image is replaced by the next readable one (the batch keeps its size, so processes stay in
    step) and its path is returned, to be named in the log."""

    def __init__(self, data: ImageSet, cfg: Config, epoch: int):
        self.files, self.labels = data.files, data.labels
        self.crops = per_image_crops(cfg)
        self.seed, self.epoch = cfg.seed, epoch

    def __len__(self):
        return len(self.files)

    def __getitem__(self, item):
        from torchvision.transforms.v2.functional import pil_to_tensor
        position, i = item
        torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_003 + position)
        bad = []
        for k in range(len(self.files)):
            image = read_rgb(self.files[(i + k) % len(self.files)])
            if image is not None:
                return [pil_to_tensor(crop(image)) for crop in self.crops], bad
            bad.append(self.files[(i + k) % len(self.files)])
        return None, bad


def read_rgb(path):
    """An image as 8-bit RGB (grayscale, palette, RGBA and 16-bit converted), or None if unreadable."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                im = im.point(lambda v: v / 256).convert("L")
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError):
        return None


def collate_views(items):
    """Stack view k of every image; collect the files that could not be read."""
    bad = [path for _, paths in items for path in paths]
    if any(views is None for views, _ in items):
        raise DinoError(f"no image in the training folder could be read ({bad[0]} and "
                        f"{len(bad) - 1} more); is --data a folder of images?")
    return [torch.stack(vs) for vs in zip(*(views for views, _ in items))], bad


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the images in one epoch: a pure function of (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def train_batches(data: ImageSet, cfg: Config, epoch: int, device, start_step: int = 0,
                  rank: int = 0, world: int = 1):
    """Yield (views, unreadable files) for the steps of one epoch from start_step on; views are
    normalised float tensors on the device. Deterministic given (seed, epoch, step).

    Under `world` processes a step takes world · batch_size images in the epoch's order and this
    process keeps rows rank · batch_size … (rank + 1) · batch_size - 1 (what a distributed
    sampler does); the random parameters are drawn for the whole global batch, so the views
    are the same however many processes share it.
    """
    B = cfg.batch_size
    GB = B * world
    order = epoch_order(len(data), cfg.seed, epoch)
    steps = len(data) // GB
    rows = slice(rank * B, (rank + 1) * B) if world > 1 else None
    if data.images is not None:  # in memory (on the GPU when training there)
        order = order.to(data.images.device)
        for s in range(start_step, steps):
            idx = order[s * GB + rank * B: s * GB + (rank + 1) * B]
            g = step_generator(cfg.seed, epoch, s, device)
            yield multicrop(data.images[idx].to(device, non_blocking=True), cfg, g, GB, rows), []
        return
    items = [(p, int(order[p])) for s in range(start_step, steps)
             for p in range(s * GB + rank * B, s * GB + (rank + 1) * B)]
    loader = torch.utils.data.DataLoader(
        FolderMultiCrop(data, cfg, epoch), batch_size=B, sampler=items,
        num_workers=cfg.num_workers, collate_fn=collate_views, drop_last=True,
        worker_init_fn=_leave_ctrl_c_to_the_main_process)
    for s, (crops, bad) in enumerate(loader, start=start_step):
        g = step_generator(cfg.seed, epoch, s, device)
        views = []
        for name, v in zip(view_names(cfg.local_crops_number), crops):
            v = v.to(device, non_blocking=True).float() / 255
            size = v.shape[-1]
            p = sample_view_params(GB, size, size, size, (1.0, 1.0), VIEW_SPECS[name], g)
            if rows is not None:
                p = {k: t[rows] for k, t in p.items()}
            v = torch.where(p["flip"].view(-1, 1, 1, 1), v.flip(-1), v)  # the crop was done per image
            views.append(normalize(photometric(v, p)))
        yield views, bad


def _leave_ctrl_c_to_the_main_process(worker_id):
    # Ctrl-C reaches every process of the terminal; the main one finishes its step and saves,
    # which needs the workers alive until then
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def eval_batches(data: ImageSet, size: int, batch_size: int = 256):
    """(images, labels) batches of centre views at the training resolution, for feature extraction."""
    if data.images is not None:
        for s in range(0, len(data), batch_size):
            x = data.images[s:s + batch_size].float() / 255
            if x.shape[-1] != size or x.shape[-2] != size:
                x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True).clamp(0, 1)
            yield normalize(x), data.labels[s:s + batch_size]
        return
    from torchvision.transforms import v2 as T
    resize = round(size * 256 / 224) if size >= 96 else size  # the authors' 256 → 224 centre crop
    tf = T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                    T.CenterCrop(size), T.PILToTensor()])
    dataset = _EvalFolder(data, tf)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=2)
    for x, y, ok in loader:
        yield normalize(x[ok].float() / 255), y[ok]


class _EvalFolder(torch.utils.data.Dataset):
    def __init__(self, data, tf):
        self.data, self.tf = data, tf

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        image = read_rgb(self.data.files[i])
        if image is None:
            return torch.zeros(3, *self.tf.transforms[1].size, dtype=torch.uint8), -1, False
        return self.tf(image), int(self.data.labels[i]), True


# ------------------------------------------------------------------------------------------------
# 3. Student and teacher networks: backbone + projection head, and the DINO loss.
# ------------------------------------------------------------------------------------------------

class DINOHead(nn.Module):
    """MLP (3 layers, GELU) → L2-normalised bottleneck → weight-normalised linear layer to K."""

    def __init__(self, in_dim, out_dim, use_bn=False, norm_last_layer=True, nlayers=3,
                 hidden_dim=2048, bottleneck_dim=256):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < nlayers - 1:
                layers += [nn.BatchNorm1d(b)] if use_bn else []
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.apply(vit._init_weights)
        # last layer: W = g · V / ‖V‖ per output row; g fixed to 1 when norm_last_layer
        self.last_layer = nn.utils.parametrizations.weight_norm(
            nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0
        g.data.fill_(1.0)
        g.requires_grad = not norm_last_layer

    def forward(self, x):
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)  # L2 normalisation of the bottleneck
        return self.last_layer(x)


class MultiCropWrapper(nn.Module):
    """g = head ∘ backbone over a list of views; views of equal size share one backbone pass."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, views):
        outputs, start = [], 0
        while start < len(views):
            end = start
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            outputs.append(self.backbone(torch.cat(views[start:end])))  # (views · B, D)
            start = end
        return self.head(torch.cat(outputs))  # (V · B, K), view-major


def build_networks(cfg: Config, device):
    def one(drop_path):
        backbone = vit.build_vit(cfg.arch, cfg.patch_size, img_size=cfg.global_crops_size,
                                 drop_path_rate=drop_path)
        head = DINOHead(backbone.embed_dim, cfg.out_dim, cfg.use_bn_in_head, cfg.norm_last_layer,
                        hidden_dim=cfg.hidden_dim, bottleneck_dim=cfg.bottleneck_dim)
        return MultiCropWrapper(backbone, head)

    student = one(cfg.drop_path_rate).to(device)
    teacher = one(0.0).to(device)  # drop-path in the student only
    teacher.load_state_dict(student.state_dict())  # θ_t starts equal to θ_s
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher


def dino_loss(student_out, teacher_out, center, tau_s, tau_t, n_global=2):
    """The DINO loss and its collapse diagnostics.

    student_out: (V·B, K) student logits for all V views (view-major);
    teacher_out: (n_global·B, K) teacher logits for the global views.
    Returns (loss, stats) with stats = {"pairs": (n_global, V) matrix of H terms (diagonal
    skipped), "teacher_entropy": mean h(P_t), "kl": mean KL(P_t ‖ P_s)}.
    """
    V = student_out.shape[0] // (teacher_out.shape[0] // n_global)
    # $$P_s(x)^{(i)} = \frac{\exp(g_{\theta_s}(x)^{(i)} / \tau_s)}{\sum_{k=1}^{K} \exp(g_{\theta_s}(x)^{(k)} / \tau_s)}$$
    log_p_s = rearrange(F.log_softmax(student_out.float() / tau_s, dim=-1), "(v b) k -> v b k", v=V)
    # centering and sharpening: $$P_t(x) = \mathrm{softmax}\big((g_{\theta_t}(x) - c) / \tau_t\big)$$
    # the teacher is a target: no gradient flows through it
    p_t = F.softmax((teacher_out.float() - center) / tau_t, dim=-1).detach()
    p_t = rearrange(p_t, "(u b) k -> u b k", u=n_global)
    B = p_t.shape[1]
    # $$H(P_t(u), P_s(v)) = -\frac{1}{B}\sum_b \sum_k P_t(u)^{(k)} \log P_s(v)^{(k)}$$ for every pair
    pairs = -torch.einsum("ubk,vbk->uv", p_t, log_p_s) / B  # (n_global, V)
    # $$\mathcal{L} = \frac{1}{n_{pairs}} \sum_{x \in \{x^g_1, x^g_2\}} \sum_{x' \in V,\, x' \neq x} H(P_t(x), P_s(x'))$$
    same_view = torch.eye(n_global, V, dtype=torch.bool, device=pairs.device)
    loss = pairs.masked_fill(same_view, 0.0).sum() / (n_global * V - min(n_global, V))
    # $$h(P_t) = -\sum_k P_t^{(k)} \log P_t^{(k)}$$; since H = h + KL, mean KL = loss − mean h
    entropy = -(p_t * torch.log(p_t.clamp_min(1e-30))).sum(-1).mean()
    return loss, {"pairs": pairs.detach(), "teacher_entropy": entropy.detach(),
                  "kl": (loss - entropy).detach()}


@torch.no_grad()
def update_center(center, teacher_out, m):
    # $$c \leftarrow m\,c + (1 - m)\,\frac{1}{B}\sum_{i=1}^{B} g_{\theta_t}(x_i)$$
    batch_center = all_reduce_mean(teacher_out.float().mean(dim=0, keepdim=True))
    return m * center + (1 - m) * batch_center


def all_reduce_mean(x):
    """Average over processes under torch.distributed; the identity on one process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        x = x.clone()
        torch.distributed.all_reduce(x)
        x /= torch.distributed.get_world_size()
    return x


# ------------------------------------------------------------------------------------------------
# 4. Teacher EMA.
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def update_teacher(teacher, student, momentum):
    # $$\theta_t \leftarrow \lambda\,\theta_t + (1 - \lambda)\,\theta_s$$  (parameters only, not buffers)
    t = [p for p in teacher.parameters()]
    s = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1 - momentum)


# ------------------------------------------------------------------------------------------------
# 5. Schedules, precomputed per step (or per epoch for τ_t) and indexed in the loop.
# ------------------------------------------------------------------------------------------------

def cosine_schedule(base, final, epochs, steps_per_epoch, warmup_epochs=0, start_warmup=0.0):
    """Linear warm-up from start_warmup to base, then a cosine from base to final."""
    total = epochs * steps_per_epoch
    warmup_steps = min(warmup_epochs * steps_per_epoch, total)  # a warm-up longer than the run is cut
    warmup = torch.linspace(start_warmup, base, warmup_epochs * steps_per_epoch + 1)[:warmup_steps]
    T = total - warmup_steps - 1  # the cosine runs over steps t = 0 … T
    t = torch.arange(T + 1, dtype=torch.float64)
    # $$v_t = v_{final} + \tfrac{1}{2}(v_{base} - v_{final})\big(1 + \cos(\pi t / T)\big)$$
    # (the authors divide by T + 1, so their last value falls just short of v_final)
    cosine = final + 0.5 * (base - final) * (1 + torch.cos(math.pi * t / max(T, 1)))
    return torch.cat([warmup.double(), cosine])


def teacher_temp_schedule(cfg: Config):
    """τ_t per epoch: linear from warmup_teacher_temp to teacher_temp, then constant."""
    warm = min(cfg.warmup_teacher_temp_epochs, cfg.epochs)
    ramp = torch.linspace(cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.warmup_teacher_temp_epochs)
    return torch.cat([ramp[:warm], torch.full((cfg.epochs - warm,), cfg.teacher_temp)]).double()


def schedules(cfg: Config, steps_per_epoch: int, world_size: int = 1) -> dict:
    # linear scaling rule: $$lr = lr_{base} \cdot \frac{\text{total batch}}{256}$$
    peak_lr = cfg.lr * cfg.batch_size * world_size / 256
    return {
        "lr": cosine_schedule(peak_lr, cfg.min_lr, cfg.epochs, steps_per_epoch, cfg.warmup_epochs),
        "wd": cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, steps_per_epoch),
        # λ: cosine from momentum_teacher to 1
        "momentum": cosine_schedule(cfg.momentum_teacher, 1.0, cfg.epochs, steps_per_epoch),
        "teacher_temp": teacher_temp_schedule(cfg),  # per epoch
    }


# ------------------------------------------------------------------------------------------------
# 6. Training.
# ------------------------------------------------------------------------------------------------

def param_groups(model):
    """Weight decay on weight matrices only: no decay on biases and 1-D (norm) parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def clip_gradients(model, clip):
    """Clip each parameter's gradient to norm `clip` separately, as the authors do."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    # $$g \leftarrow g \cdot \min\big(1, \mathrm{clip} / (\lVert g \rVert + 10^{-6})\big)$$
    factors = torch._foreach_add(torch._foreach_norm(grads), 1e-6)
    torch._foreach_reciprocal_(factors)
    torch._foreach_mul_(factors, clip)
    torch._foreach_clamp_max_(factors, 1.0)
    torch._foreach_mul_(grads, factors)


def cancel_last_layer_gradients(student, epoch, freeze_last_layer):
    if epoch < freeze_last_layer:
        for p in student.head.last_layer.parameters():
            p.grad = None


def resolve_device(name):
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DinoError(f"--device {name} asked for a GPU but PyTorch sees none; use --device cpu")
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # torchrun: one GPU each
    return torch.device("cpu" if name == "auto" else name)


# -- several processes (torchrun). With one process every helper here does nothing. ---------------

def init_distributed(device: str = "auto") -> tuple[int, int]:
    """Join the process group torchrun describes in RANK/WORLD_SIZE/MASTER_ADDR; (rank, world).
    NCCL between GPUs, gloo between CPU processes."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1 or dist.is_initialized():
        return rank_and_world()
    gpu = resolve_device(device).type == "cuda"
    if gpu:
        torch.cuda.set_device(resolve_device(device))
    dist.init_process_group("nccl" if gpu else "gloo")
    return rank_and_world()


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_max(x):
    if rank_and_world()[1] > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def gather_rows(x, device):
    """Every process's rows of x, concatenated in rank order (on the CPU)."""
    _, world = rank_and_world()
    if world == 1:
        return x
    x = x.to(device)
    count = torch.tensor([len(x)], device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    longest = int(max(counts))  # all_gather needs equal sizes: pad, gather, trim
    padded = torch.zeros(longest, *x.shape[1:], dtype=x.dtype, device=device)
    padded[:len(x)] = x
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:int(c)] for part, c in zip(parts, counts)]).cpu()


def gather_lists(items: list) -> list:
    """The concatenation of every process's list (e.g. of unreadable files)."""
    _, world = rank_and_world()
    if world == 1:
        return items
    out = [None] * world
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def shard(data: ImageSet, rank: int, world: int) -> ImageSet:
    """This process's contiguous share of a split, for feature extraction."""
    if world == 1:
        return data
    idx = torch.tensor_split(torch.arange(len(data)), world)[rank]
    return ImageSet(labels=data.labels[idx], classes=data.classes,
                    images=None if data.images is None else data.images[idx],
                    files=None if data.files is None else [data.files[i] for i in idx.tolist()])


def save_checkpoint(state: dict, path: Path):
    """Write atomically: to a temporary file, flushed and fsynced, then renamed over the old one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu") -> dict:
    """torch.load(path, weights_only=True), every failure turned into a one-line DinoError."""
    import zipfile
    path = Path(path)
    if not path.is_file():
        raise DinoError(f"{path} does not exist or is not a file")
    with open(path, "rb") as f:
        first = f.read(1)
    # torch.save writes a zip archive (older releases: a pickle, whose first byte is 0x80)
    if not zipfile.is_zipfile(path) and first != b"\x80":
        raise DinoError(f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle "
                        f"as torch.save writes)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise DinoError(f"{path} holds more than tensors and plain values, so it is not loaded "
                        f"(unpickling it could run code): {str(e).splitlines()[0]}") from None
    except Exception as e:  # a damaged archive can fail in many ways inside torch.load
        raise DinoError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'no message'})") from None


MODEL_FIELDS = ("arch", "patch_size", "out_dim", "hidden_dim", "bottleneck_dim",
                "norm_last_layer", "use_bn_in_head", "global_crops_size")


def use_bf16(precision: str, device) -> bool:
    """--precision auto: bf16 autocast on GPUs, fp32 on CPUs. On a CPU with bf16 in hardware
    `--precision bf16` is faster (README, Speed), but the default stays fp32 there: results then
    do not depend on the CPU, and over seeds 0, 1, 2 the default run scored 41.1 / 42.3 / 42.3 %
    k-NN in fp32 against 39.3 / 38.7 / 43.2 % in bf16 (3.5-4 against 2.7-3 min, AMD EPYC)."""
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda"


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX; Linux' /proc/cpuinfo)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def duration(minutes: float) -> str:
    """A time for people: '7 min', '3.5 h', '4.8 days'."""
    if minutes < 90:
        return f"{minutes:.0f} min"
    if minutes < 48 * 60:
        return f"{minutes / 60:.1f} h"
    return f"{minutes / 60 / 24:.1f} days"


class Trainer:
    """Holds the networks, optimizer, center and schedules; `fit()` runs the epochs.

    Under torchrun each process holds a full copy; the student is wrapped in
    DistributedDataParallel, which averages the gradients, so every copy stays identical.
    """

    def __init__(self, cfg: Config, train: ImageSet, evaluation: ImageSet | None, quiet=False):
        self.cfg, self.train_set, self.eval_set = cfg, train, evaluation
        self.rank, self.world = rank_and_world()
        self.quiet = quiet or self.rank != 0  # only the first process prints and writes
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        if self.device.type == "cuda" and train.images is not None:
            # in-memory data lives on the GPU as uint8 (CIFAR-10: 150 MB); views are made there
            self.train_set = dataclasses.replace(train, images=train.images.to(self.device))
        self.student, self.teacher = build_networks(cfg, self.device)
        if self.world > 1 and cfg.use_bn_in_head and self.device.type == "cuda":
            # BatchNorm over the global batch, as the authors do (SyncBatchNorm runs on GPUs only;
            # with gloo on CPUs each process normalises over its own rows)
            self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
            self.teacher = nn.SyncBatchNorm.convert_sync_batchnorm(self.teacher)
        student = self.student
        if self.world > 1:
            student = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # what the step calls: the networks themselves, or their torch.compile'd versions
        self.student_fn, self.teacher_fn = student, self.teacher
        if cfg.compile:
            self.student_fn, self.teacher_fn = torch.compile(student), torch.compile(self.teacher)
        if cfg.optimizer == "adamw":
            # fused: one kernel for all parameters, on GPUs and (from torch 2.4) CPUs alike, where
            # it is 3x faster than the per-tensor loop (0.5 against 1.6 ms for the shapes model)
            self.optimizer = torch.optim.AdamW(param_groups(self.student), fused=True)
        else:
            self.optimizer = torch.optim.SGD(param_groups(self.student), lr=0, momentum=0.9)
        self.center = torch.zeros(1, cfg.out_dim, device=self.device)  # c
        self.bf16 = use_bf16(cfg.precision, self.device)
        self.steps_per_epoch = len(train) // (cfg.batch_size * self.world)
        self.schedule = schedules(cfg, self.steps_per_epoch, self.world)
        self.start_epoch, self.start_step = 0, 0
        self.history = []
        self.progress = self.fresh_progress(0)  # the running sums of the epoch in progress
        # the first iteration whose loss was not finite (inf: none), kept on the device
        self.first_bad = torch.tensor(math.inf, device=self.device)
        self.stop_requested = self.saved_on_stop = False
        self.output_dir = Path(cfg.output_dir)
        self.checkpoint_path = self.output_dir / "checkpoint.pth"

    # -- one step -------------------------------------------------------------------------------
    def train_step(self, views, it, epoch):
        cfg = self.cfg
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = float(self.schedule["lr"][it])
            if i == 0:  # only the first group is regularised
                group["weight_decay"] = float(self.schedule["wd"][it])
        tau_t = float(self.schedule["teacher_temp"][epoch])
        # drop-path draws from the global generator: seed it per (step, process), so a resumed
        # run draws what an uninterrupted one would
        torch.manual_seed(((cfg.seed * 1_000_003 + it) * 1_000_003 + self.rank) % 2 ** 63)
        # the networks in bf16 where asked; the loss outside autocast, in fp32 (in bf16 its sum
        # over K would be good to 2-3 digits only)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            with torch.no_grad():
                teacher_out = self.teacher_fn(views[:2])  # the teacher sees the 2 global views
            student_out = self.student_fn(views)  # the student sees all views
        loss, stats = dino_loss(student_out, teacher_out, self.center, cfg.student_temp, tau_t)
        if cfg.centering:
            self.center = update_center(self.center, teacher_out, cfg.center_momentum)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under DDP the gradients are averaged over the processes here
        if cfg.clip_grad:
            clip_gradients(self.student, cfg.clip_grad)
        cancel_last_layer_gradients(self.student, epoch, cfg.freeze_last_layer)
        self.optimizer.step()
        update_teacher(self.teacher, self.student, float(self.schedule["momentum"][it]))
        # remember the first non-finite loss without waiting for the device
        self.first_bad = torch.where(loss.detach().isfinite(), self.first_bad,
                                     self.first_bad.clamp(max=float(it)))
        return loss.detach(), stats

    # -- epochs -----------------------------------------------------------------------------------
    def fresh_progress(self, epoch):
        # files found unreadable when loading (empty, or decoded into memory) count in epoch 1
        return {"sums": torch.zeros(3, device=self.device),  # loss, entropy, kl
                "n": 0, "skipped": list(self.train_set.skipped) if epoch == 0 else []}

    def fit(self, log=print, stop_after=None):
        """Train from where the run stands to cfg.epochs (or to epoch stop_after, as an
        interruption would). Ctrl-C or SIGTERM finishes the step, saves, and raises
        KeyboardInterrupt; a non-finite loss raises DinoError without saving over the checkpoint."""
        log = log if self.rank == 0 else (lambda *_: None)
        with self.stop_on_signals():
            return self._fit(log, stop_after)

    def _fit(self, log, stop_after):
        from tqdm.auto import tqdm
        cfg = self.cfg
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        log_K = math.log(cfg.out_dim)
        started = time.time()
        warm = 0  # steps timed for the estimate
        for epoch in range(self.start_epoch, stop_after or cfg.epochs):
            t0 = time.time()
            first = self.start_step if epoch == self.start_epoch else 0
            if first == 0:
                self.progress = self.fresh_progress(epoch)
            self.student.train()
            bar = tqdm(train_batches(self.train_set, cfg, epoch, self.device, first, self.rank,
                                     self.world),
                       initial=first, total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       disable=self.quiet, leave=False, dynamic_ncols=True)
            for step, (views, bad) in enumerate(bar, start=first):
                if bad and cfg.strict_data:
                    raise unreadable(bad[0])
                self.progress["skipped"] += bad
                it = epoch * self.steps_per_epoch + step
                loss, stats = self.train_step(views, it, epoch)
                self.progress["sums"] += torch.stack([loss, stats["teacher_entropy"], stats["kl"]])
                self.progress["n"] += 1
                warm += 1
                if warm in (2, 5) and epoch == self.start_epoch:  # time 3 warm steps, once
                    loss.item()  # wait for the device
                    if warm == 2:
                        t_warm = time.time()
                    elif not self.quiet:
                        bar.write(self.time_estimate((time.time() - t_warm) / 3, epoch, step))
                if step % 10 == 0:  # a host-device sync, so only every 10 steps
                    self.check_finite()
                    bar.set_postfix(loss=f"{loss.item():.3f}", h_t=f"{stats['teacher_entropy'].item():.2f}")
                if self.should_stop(step):
                    bar.close()
                    self.save(epoch, step + 1)
                    self.saved_on_stop = True
                    log(f"\ninterrupted: saved {self.checkpoint_path} at epoch {epoch + 1}, step "
                        f"{step + 1}/{self.steps_per_epoch}; run the same command to resume")
                    raise KeyboardInterrupt
                if cfg.save_every and (it + 1) % cfg.save_every == 0 and step + 1 < self.steps_per_epoch:
                    self.save(epoch, step + 1)
            bar.close()
            self.check_finite()
            sums = all_reduce_mean(self.progress["sums"]) / max(self.progress["n"], 1)
            mean = sums.tolist()
            it_last = (epoch + 1) * self.steps_per_epoch - 1
            record = dict(epoch=epoch + 1, loss=mean[0], teacher_entropy=mean[1], kl=mean[2],
                          log_K=log_K, center_norm=self.center.norm().item(),
                          lr=float(self.schedule["lr"][it_last]), wd=float(self.schedule["wd"][it_last]),
                          momentum=float(self.schedule["momentum"][it_last]),
                          teacher_temp=float(self.schedule["teacher_temp"][epoch]),
                          seconds=time.time() - t0)
            skipped = gather_lists(self.progress["skipped"])
            if skipped:
                record["unreadable_files"] = skipped
                log(f"warning: skipped {len(skipped)} unreadable image(s) (named in "
                    f"{self.output_dir / 'log.jsonl'}): {', '.join(skipped[:5])}"
                    + (" ..." if len(skipped) > 5 else ""))
            last = epoch + 1 == cfg.epochs
            # processes agree on stopping, or the one that carries on would wait for the others
            out_of_time = bool(all_reduce_max(torch.tensor(
                float(bool(cfg.time_limit) and time.time() - started > 60 * cfg.time_limit),
                device=self.device)))
            if self.eval_set is not None and ((cfg.knn_every and (epoch + 1) % cfg.knn_every == 0)
                                              or last or out_of_time):
                record["knn_top1"] = self.knn()
            self.history.append(record)
            self.save(epoch + 1, 0)
            if self.rank == 0:
                with open(self.output_dir / "log.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            log(format_record(record))
            warning = collapse_warning(record["teacher_entropy"], log_K)
            if warning:
                log(warning)
            if out_of_time and not last:
                log(f"stopping after epoch {epoch + 1}: --time_limit {cfg.time_limit} min reached")
                break
        return self.history

    def time_estimate(self, seconds_per_step, epoch, step):
        steps_left = (self.cfg.epochs - epoch) * self.steps_per_epoch - step - 1
        minutes = seconds_per_step * steps_left / 60
        text = (f"about {seconds_per_step:.2f} s/step: {duration(minutes)} for the remaining "
                f"{steps_left} steps on {self.device.type}")
        if self.device.type == "cpu" and minutes > 60:
            hints = ["a GPU makes this minutes"]
            if not self.bf16 and cpu_has_native_bf16():
                hints.append("--precision bf16 trains 1.4-2x faster on this CPU")
            if self.cfg.data != "shapes":
                hints.append("for a quick run on this CPU try the built-in data set: python dino.py")
            text += f" ({'; '.join(hints)})"
        return text

    # -- interruptions and failures ---------------------------------------------------------------
    @contextlib.contextmanager
    def stop_on_signals(self):
        """Ctrl-C (SIGINT) or SIGTERM (sent by SLURM before it kills a job) asks the loop to stop
        after the current step and save; a second Ctrl-C stops at once."""
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread
            return
        self.stop_requested = False

        def ask_to_stop(signum, frame):
            if self.stop_requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.stop_requested = True

        previous = {s: signal.signal(s, ask_to_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def should_stop(self, step):
        if self.world == 1:
            return self.stop_requested
        # processes must agree on the step they stop at: ask them all, every 10 steps
        return step % 10 == 0 and bool(all_reduce_max(torch.tensor(
            float(self.stop_requested), device=self.device)))

    def check_finite(self):
        """Raise if a loss so far was not finite (a host-device sync: call it on a cadence)."""
        bad = -float(all_reduce_max(-self.first_bad))  # the earliest over the processes
        if math.isfinite(bad):
            epoch, step = divmod(int(bad), self.steps_per_epoch)
            kept = (f"{self.checkpoint_path} still holds the last good state"
                    if self.checkpoint_path.exists() else "no checkpoint was written")
            raise DinoError(f"the loss became NaN or infinite at epoch {epoch + 1}, step {step} "
                            f"(iteration {int(bad)}); {kept}. Try a lower --lr, --precision fp32, "
                            f"or a higher --momentum_teacher")
        weights = torch._foreach_norm([p.detach() for p in self.student.parameters()])
        if not torch.stack(weights).isfinite().all():
            raise DinoError(f"the student's weights became NaN or infinite; {self.checkpoint_path} "
                            f"still holds the last good state. Try a lower --lr or --precision fp32")

    def knn(self, k=20, T=0.07):
        """Weighted k-NN of the teacher's features; under several processes each extracts the
        features of its share of the images and the shares are gathered."""
        backbone = self.teacher.backbone
        backbone.eval()
        size = self.cfg.global_crops_size

        def features(data):
            part = shard(data, self.rank, self.world)
            f, y = extract_features(backbone, eval_batches(part, size), self.device)
            return gather_rows(f, self.device), gather_rows(y, self.device)

        train_f, train_y = features(self.train_set)
        test_f, test_y = features(self.eval_set)
        top1, _ = knn_accuracy(train_f, train_y, test_f, test_y, k=k, T=T,
                               num_classes=len(self.train_set.classes))
        return top1

    # -- checkpoints ------------------------------------------------------------------------------
    def state(self, epoch, step=0):
        """Everything a resumed run needs to continue bitwise: weights, optimizer, center, the
        position (epoch, step) and the running sums of the epoch. The data order, the views and
        drop-path are pure functions of (seed, epoch, step), so the position fixes them."""
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                "optimizer": self.optimizer.state_dict(), "center": self.center.cpu(),
                "epoch": epoch, "step": step, "config": config_to_dict(self.cfg),
                "history": self.history,
                "progress": {"sums": all_reduce_mean(self.progress["sums"]).cpu(),
                             "n": self.progress["n"],
                             "skipped": gather_lists(self.progress["skipped"])},
                # the backbone's dimensions, so the weights stay loadable if vit.ARCHS changes
                "vit": dict(zip(("embed_dim", "depth", "num_heads"), vit.ARCHS[self.cfg.arch])),
                "world_size": self.world, "rng": rng}

    def save(self, epoch, step=0):
        """Check that the state is finite, then write it (first process only, atomically).
        Every process calls this: the state gathers sums and file names from all of them."""
        self.check_finite()
        state = self.state(epoch, step)
        if self.rank == 0:
            save_checkpoint(state, self.checkpoint_path)

    def resume(self, log=print):
        if not self.checkpoint_path.exists():
            return False
        ck = load_checkpoint(self.checkpoint_path)
        if not isinstance(ck, dict) or "teacher" not in ck or "student" not in ck:
            raise DinoError(f"{self.checkpoint_path} is not a DINO checkpoint of this project; "
                            f"use another --output_dir")
        saved = ck.get("config", {})
        changed = [f"{k}: {saved.get(k)} → {getattr(self.cfg, k)}" for k in MODEL_FIELDS
                   if k in saved and _plain(saved[k]) != _plain(getattr(self.cfg, k))]
        if changed:
            raise DinoError(f"{self.checkpoint_path} was trained with other model settings "
                            f"({'; '.join(changed)}); use another --output_dir to start afresh")
        step = ck.get("step", 0)
        if step and ck.get("world_size", 1) * saved.get("batch_size", 0) != self.world * self.cfg.batch_size:
            raise DinoError(f"{self.checkpoint_path} stopped inside an epoch with a global batch of "
                            f"{ck.get('world_size', 1) * saved.get('batch_size', 0)}; resume with the "
                            f"same --batch_size and number of processes")
        self.student.load_state_dict(ck["student"])
        self.teacher.load_state_dict(ck["teacher"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.center = ck["center"].to(self.device)
        self.start_epoch, self.start_step = ck["epoch"], step
        self.history = list(ck.get("history", []))
        if "progress" in ck:
            p = ck["progress"]
            self.progress = {"sums": p["sums"].to(self.device), "n": p["n"],
                             "skipped": list(p["skipped"]) if self.rank == 0 else []}
        torch.set_rng_state(ck["rng"]["torch"])
        random.setstate(_as_tuple(ck["rng"]["python"]))
        if "cuda" in ck["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(ck["rng"]["cuda"], self.device)
        where = f"epoch {self.start_epoch}/{self.cfg.epochs}" + (
            f" + {step}/{self.steps_per_epoch} steps" if step else "")
        if self.rank == 0:
            log(f"resumed from {self.checkpoint_path} at {where}")
        return True


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def _as_tuple(v):
    return tuple(_as_tuple(x) for x in v) if isinstance(v, (list, tuple)) else v


def config_to_dict(cfg: Config) -> dict:
    return {k: _plain(v) for k, v in dataclasses.asdict(cfg).items()}


def format_record(r: dict) -> str:
    text = (f"epoch {r['epoch']:>3}  loss {r['loss']:.4f}  h(P_t) {r['teacher_entropy']:.3f}"
            f"/{r['log_K']:.2f}  KL {r['kl']:.3f}  |c| {r['center_norm']:.3f}  lr {r['lr']:.2e}  "
            f"{r['seconds']:.0f}s")
    if "knn_top1" in r:
        text += f"  k-NN top-1 {r['knn_top1']:.2f}%"
    return text


def collapse_warning(entropy, log_K):
    """Paper Figure 7: entropy → 0 is collapse to one dimension, entropy → log K to uniform."""
    if entropy < 0.05 * log_K:
        return (f"warning: teacher entropy {entropy:.3f} is near 0: collapse to one dimension "
                f"(centering off or too weak?)")
    if entropy > 0.95 * log_K:
        return (f"warning: teacher entropy {entropy:.3f} is near log K = {log_K:.3f}: collapse to "
                f"the uniform distribution (teacher temperature too high?)")
    return None


# ------------------------------------------------------------------------------------------------
# 7. Command line: every Config field is a flag; flags given explicitly beat the preset.
# ------------------------------------------------------------------------------------------------

def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = Config()
    for f in dataclasses.fields(Config):
        default = getattr(defaults, f.name)
        help_text = f.metadata["help"] + f" (paper/default: {default})"
        if isinstance(default, bool):
            parser.add_argument(f"--{f.name}", dest=f.name, action="store_true",
                                default=argparse.SUPPRESS, help=help_text)
            parser.add_argument(f"--no_{f.name}", dest=f.name, action="store_false",
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        elif isinstance(default, tuple):
            parser.add_argument(f"--{f.name}", type=float, nargs=2, default=argparse.SUPPRESS,
                                metavar=("MIN", "MAX"), help=help_text)
        else:
            parser.add_argument(f"--{f.name}", type=type(default), default=argparse.SUPPRESS,
                                help=help_text)
    return parser


def make_config(explicit: dict, image_size: int, name: str) -> Config:
    gpu = resolve_device(explicit.get("device", Config.device)).type == "cuda"
    cfg = config_from({**preset_for(image_size, name, gpu), **explicit})
    if not cfg.output_dir:
        cfg.output_dir = str(Path("runs") / name)
    validate(cfg)
    return cfg


def config_from(values: dict) -> Config:
    return Config(**{k: tuple(v) if isinstance(getattr(Config, k, None), tuple) else v
                     for k, v in values.items()})


def validate(cfg: Config, sizes: bool = True):
    """One-line errors for impossible values. sizes=False skips the checks that depend on the
    data's preset (crop sizes against the patch size), so the flags can be checked before any
    data is read."""
    def need(ok, message):
        if not ok:
            raise DinoError(message)

    need(cfg.arch in vit.ARCHS, f"--arch {cfg.arch} is unknown; choose one of {', '.join(vit.ARCHS)}")
    need(cfg.epochs >= 1, f"--epochs must be at least 1, got {cfg.epochs}")
    need(cfg.batch_size >= 1, f"--batch_size must be at least 1, got {cfg.batch_size}")
    need(cfg.patch_size >= 1, f"--patch_size must be at least 1, got {cfg.patch_size}")
    for flag in ("global_crops_size", "local_crops_size") if sizes else ():
        size = getattr(cfg, flag)
        need(size > 0 and size % cfg.patch_size == 0,
             f"--{flag} {size} is not a positive multiple of --patch_size {cfg.patch_size}")
    for flag in ("global_crops_scale", "local_crops_scale"):
        lo, hi = getattr(cfg, flag)
        need(0 < lo <= hi <= 1, f"--{flag} {lo} {hi} must satisfy 0 < min <= max <= 1")
    need(cfg.local_crops_number >= 0, f"--local_crops_number must be >= 0, got {cfg.local_crops_number}")
    need(cfg.out_dim >= 2, f"--out_dim must be at least 2, got {cfg.out_dim}")
    for flag in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
        need(getattr(cfg, flag) > 0, f"--{flag} must be positive, got {getattr(cfg, flag)}")
    for flag in ("momentum_teacher", "center_momentum"):
        need(0 <= getattr(cfg, flag) <= 1, f"--{flag} must be in [0, 1], got {getattr(cfg, flag)}")
    need(cfg.lr > 0, f"--lr must be positive, got {cfg.lr}")
    need(cfg.warmup_epochs >= 0 and cfg.warmup_teacher_temp_epochs >= 0,
         "--warmup_epochs and --warmup_teacher_temp_epochs must be >= 0")
    need(cfg.optimizer in ("adamw", "sgd"), f"--optimizer {cfg.optimizer} is unknown; use adamw or sgd")
    need(cfg.precision in ("auto", "bf16", "fp32"),
         f"--precision {cfg.precision} is unknown; use auto, bf16 or fp32")
    need(cfg.num_workers >= 0, f"--num_workers must be >= 0, got {cfg.num_workers}")
    need(cfg.save_every >= 0, f"--save_every must be >= 0, got {cfg.save_every}")


def main(argv=None):
    explicit = vars(build_parser().parse_args(argv))
    rank, world = init_distributed(explicit.get("device", Config.device))  # (0, 1) without torchrun
    try:
        return run(explicit, print if rank == 0 else (lambda *_, **__: None))
    finally:
        if world > 1:
            dist.destroy_process_group()


def run(explicit: dict, say) -> int:
    _, world = rank_and_world()
    validate(config_from(explicit), sizes=False)  # bad flag values fail before any data is read
    name, train, evaluation = load_data(explicit.get("data", Config.data),
                                        strict=explicit.get("strict_data", False))
    cfg = make_config(explicit, probe_image_size(train), name)
    if len(train) < cfg.batch_size * world:
        raise DinoError(f"the training split has {len(train)} images, fewer than --batch_size "
                        f"{cfg.batch_size} x {world} process(es); lower --batch_size")
    trainer = Trainer(cfg, train, evaluation)
    dev = trainer.device
    n_params = sum(p.numel() for p in trainer.student.backbone.parameters()) / 1e6
    say(f"DINO on {name}: {len(train)} training images, "
        f"{len(evaluation) if evaluation is not None else 0} for evaluation | {cfg.arch}/"
        f"{cfg.patch_size} ({n_params:.1f}M) | K={cfg.out_dim} | 2x{cfg.global_crops_size}px + "
        f"{cfg.local_crops_number}x{cfg.local_crops_size}px views | batch {cfg.batch_size}"
        + (f" x {world} processes" if world > 1 else "")
        + f" | {cfg.epochs} epochs on {dev}" + (" (bf16 autocast)" if trainer.bf16 else "")
        + f" | output {cfg.output_dir}")
    if train.skipped:
        say(f"warning: {len(train.skipped)} unreadable image(s) left out (named in log.jsonl): "
            f"{', '.join(train.skipped[:5])}" + (" ..." if len(train.skipped) > 5 else ""))
    trainer.resume(log=say)
    if trainer.start_epoch >= cfg.epochs:
        say(f"already trained for {cfg.epochs} epochs; raise --epochs to train further")
    else:
        try:
            trainer.fit(log=say)
        except KeyboardInterrupt:
            if not trainer.saved_on_stop:  # a second Ctrl-C: the last periodic checkpoint stands
                say(f"\nstopped; the last checkpoint is {trainer.checkpoint_path}: run the same "
                    f"command to resume")
            return 130
    if evaluation is not None:
        if not trainer.history or "knn_top1" not in trainer.history[-1]:
            top1 = trainer.knn()
        else:
            top1 = trainer.history[-1]["knn_top1"]
        say(f"weighted k-NN (k=20, T=0.07, teacher backbone) top-1 on the evaluation split: "
            f"{top1:.2f}%")
        say(f"knn top1@20={top1:.2f}")
    say(peak_memory(dev))
    return 0


def peak_memory(device) -> str:
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB → GiB (Linux)
    text = f"peak memory: CPU RSS {rss:.2f} GiB"
    if device.type == "cuda":
        text += f", GPU max allocated {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB"
    return text


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DinoError as e:
        sys.exit(f"error: {e}")
