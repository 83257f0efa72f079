"""Everything between files and tensors, so that dino.py can open with the method.

dino.py, knn_eval.py and visualize.py all import this module, and it imports none of them:
  1. errors for bad input, the one seed rule, devices, peak memory
  2. data sets: the built-in `shapes`, `objects` and `silhouettes` (with masks), CIFAR-10 (pickles),
     image folders (with masks/ for the evaluation images, optionally)
  3. feeding images: folders cropped per image in workers, centre views for evaluation
The pixel operations of the augmentations live in augment.py, checkpoint files in checkpoint.py.
"""

import contextlib
import dataclasses
import math
import os
import pickle
import resource
import signal
import stat
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image, ImageOps
from torchvision.transforms import v2 as transforms
from torchvision.transforms.v2.functional import pil_to_tensor

from augment import normalize


# ------------------------------------------------------------------------------------------------
# 1. Errors, seeds, devices.
# ------------------------------------------------------------------------------------------------

class DinoError(Exception):
    """A problem with the user's input; the command lines print its message on one line."""


def require(ok: bool, message: str):
    """The one way the command lines check their input: a DinoError with `message` unless ok."""
    if not ok:
        raise DinoError(message)


# Every random stream of a run is a pure function of (seed, stream, indices), so a resumed run
# draws what an uninterrupted one would, and no two streams share a seed.
STREAMS = {"epoch_order": 1, "views": 2, "folder_crops": 3, "drop_path": 4}


def derive_seed(seed: int, stream: str, *indices: int) -> int:
    """The seed of one stream at one position, e.g. derive_seed(0, "views", epoch, step): the
    digits of (seed, stream, indices...) in base 1_000_003, a prime above any index used here."""
    value = seed
    for digit in (STREAMS[stream], *indices):
        value = value * 1_000_003 + digit
    return value % 2 ** 63


MAX_EPOCHS = 10 ** 6
MAX_STEPS = 10 ** 7
MAX_SIDE = 4096

# The ranges a number given on a command line may take; one table for the three command lines.
RULES = {
    ">0": (lambda v: v > 0, "must be positive"),
    ">=0": (lambda v: v >= 0, "must be at least 0"),
    ">=1": (lambda v: v >= 1, "must be at least 1"),
    ">=2": (lambda v: v >= 2, "must be at least 2"),
    "[0,1]": (lambda v: 0 <= v <= 1, "must be between 0 and 1"),
    "(0,1)": (lambda v: 0 < v < 1, "must be between 0 and 1, both excluded"),
    "[0,1)": (lambda v: 0 <= v < 1, "must be at least 0 and below 1"),
    "scale": (lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1, "must satisfy 0 < MIN <= MAX <= 1"),
    "file": (lambda v: not v or Path(v).is_file(), "must name an existing file"),
    # Upper bounds, where a value sizes memory or time; each a few times the largest sane value:
    # K: the head's last layer holds K x bottleneck_dim weights in each network and in AdamW's
    # two moments, and the loss K floats a view (100000000 asked for 25.6 GB); the paper: 65536
    "[2,2^18]": (lambda v: 2 <= v <= 2 ** 18, "must be at least 2 and at most 262144 (4x the paper's 65536)"),
    # head widths: a hidden layer holds width^2 weights (8192: 256 MiB); the paper: 2048 and 256
    "[1,8192]": (lambda v: 1 <= v <= 8192, "must be at least 1 and at most 8192"),
    # epochs: per-epoch arrays (tau_t) are 8 bytes an epoch; the paper's longest run has 800
    "epochs": (lambda v: 1 <= v <= MAX_EPOCHS, f"must be at least 1 and at most {MAX_EPOCHS}"),
    "epochs>=0": (lambda v: 0 <= v <= MAX_EPOCHS, f"must be at least 0 and at most {MAX_EPOCHS}"),
    # iterations: every schedule holds one float64 per iteration (5 of them: 400 MB at the cap,
    # 10x the paper's longest run, 800 epochs of ImageNet at batch 1024)
    "steps": (lambda v: 0 <= v <= MAX_STEPS, f"must be at least 0 and at most {MAX_STEPS}"),
    # minutes: 10^6 is two years; larger ones (1e308) overflowed the clock's arithmetic
    "minutes": (lambda v: 0 <= v <= 10 ** 6, "must be at least 0 and at most 1000000 minutes"),
    # seeds: torch.manual_seed takes 64 bits, derive_seed folds seeds into 63
    "seed": (lambda v: 0 <= v < 2 ** 63, "must be at least 0 and at most 2^63 - 1"),
    # image sides in px: a 4096 px RGB view is 200 MB in float32 (the paper: 224 and 96)
    "side": (lambda v: 1 <= v <= MAX_SIDE, f"must be at least 1 and at most {MAX_SIDE} px"),
    "side>=0": (lambda v: 0 <= v <= MAX_SIDE, f"must be at least 0 and at most {MAX_SIDE} px"),
    # a patch embedding holds 3 p^2 x width weights (the paper: 8 and 16)
    "patch": (lambda v: 1 <= v <= 64, "must be at least 1 and at most 64 px"),
    # views and processes: each local view is a forward pass per image (the paper: 6 to 10);
    # each data-loading worker is a process with its own copy of the data set's list
    "[0,64]": (lambda v: 0 <= v <= 64, "must be at least 0 and at most 64"),
    # figure panels: one per sample (visualize.py pca drew 1000 for more than 5 minutes)
    "panels": (lambda v: 1 <= v <= 64, "must be at least 1 and at most 64"),
}
# The longest token sequence a ViT is given here: explicit attention holds heads x N^2 floats a
# block (N = 4097: 64 MiB a head), a 64 x 64 grid of patches; the paper's largest is 28 x 28.
MAX_PATCHES = 4096


def check_patches(height: int, width: int, patch: int, what: str, fix: str):
    """A one-line error when an image of height x width px cut in patch px patches is a longer
    sequence than MAX_PATCHES (a 10000 x 3 px image became 213,000 tokens: 730 GB of attention)."""
    n = (height // patch) * (width // patch)
    require(n <= MAX_PATCHES, f"{what} {width}x{height} px is {width // patch}x{height // patch} "
                              f"= {n} patches of {patch} px, more than the {MAX_PATCHES} (a 64x64 "
                              f"grid) whose attention fits in memory; {fix}")


def check_flag(name: str, value, valid):
    """A one-line error unless --name's value obeys `valid`: a RULES key, or a tuple of choices.
    A float must be finite whatever the rule (inf and nan pass comparisons they should fail)."""
    shown = " ".join(map(str, value)) if isinstance(value, (tuple, list)) else value
    numbers = value if isinstance(value, (tuple, list)) else [value]
    require(not any(isinstance(v, float) and not math.isfinite(v) for v in numbers),
            f"--{name} must be a finite number, got {shown}")
    if isinstance(valid, tuple):
        require(value in valid, f"--{name} {shown} is unknown; choose one of {', '.join(valid)}")
    elif valid is not None:
        ok, rule = RULES[valid]
        require(all(ok(v) for v in value) if isinstance(value, list) else ok(value),
                f"--{name} {rule}, got {shown}")


def writable_folder(path, flag: str) -> Path:
    """Create the folder a command will write to and prove it writable with a probe file, so a
    read-only disk or a path through a file fails before any work, not after an epoch."""
    path = Path(path).expanduser()
    require(not path.exists() or path.is_dir(), f"{flag} {path} is a file, not a folder; "
                                                f"choose a folder")
    probe = path / f".write_probe_{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise DinoError(f"{flag} {path} cannot be written ({e.strerror or e}); choose another "
                        f"place") from None
    return path


def writable_file(path, flag: str) -> Path:
    """writable_folder for the folder of a file a command will write."""
    path = Path(path).expanduser()
    require(not path.is_dir(), f"{flag} {path} is a folder; give a file name")
    # the file is written beside it and renamed over it: never over a device, FIFO or socket
    require(not path.exists() or path.is_file(), f"{flag} {path} is a device, FIFO or other special "
                                                 f"file, not a regular file; give a file name")
    try:
        writable_folder(path.parent, flag)
    except DinoError:
        raise DinoError(f"{flag} {path} cannot be written: its folder {path.parent} cannot be "
                        f"created or written; choose another place") from None
    return path


def regular_file(path, what: str = "file", max_bytes: int | None = None) -> int:
    """The size of `path` once os.stat (through links) shows a regular file; a one-line error
    otherwise. Every reader of data, image and weight files asks it first: a named pipe, a socket
    or a device named like a data file blocks open() or read() forever, and a file over
    max_bytes takes minutes to scan. A missing file raises FileNotFoundError (OSError for a
    broken link), so each caller can say what is missing in its own words."""
    info = os.stat(path)
    require(stat.S_ISREG(info.st_mode), f"{what} {path} is not a regular file (a named pipe, "
                                        f"socket or device: reading it could block forever); "
                                        f"give a regular file")
    if max_bytes is not None and info.st_size > max_bytes:
        raise DinoError(f"{what} {path} is {info.st_size / 2 ** 20:.0f} MiB, over the "
                        f"{max_bytes // 2 ** 20} MiB that a{'n' if what[0] in 'aeiou' else ''} "
                        f"{what} may have here, so it is not opened; shrink or remove it")
    return info.st_size


def visible(path) -> bool:
    """Whether a file or folder takes part in a data set: hidden ones (.git, .ipynb_checkpoints,
    macOS's ._name files) never do, in labelled and unlabelled folders alike."""
    return not Path(path).name.startswith(".")


def resolve_device(name: str) -> torch.device:
    """--device auto: the GPU when there is one (torchrun: the process's own), else the CPU."""
    require(name == "auto" or name == "cpu" or name.startswith("cuda"),
            f"--device {name} is unknown; use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DinoError(f"--device {name} asked for a GPU but PyTorch sees none; use --device cpu")
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))  # torchrun: one GPU each
    try:
        return torch.device("cpu" if name == "auto" else name)
    except RuntimeError:
        raise DinoError(f"--device {name} is not a device name; use auto, cpu, cuda or cuda:N") from None


def peak_memory(device) -> str:
    """The process's peak resident memory (and the GPU's peak allocation), for the last line."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    rss /= 2 ** 30 if sys.platform == "darwin" else 2 ** 20
    text = f"peak memory: CPU RSS {rss:.2f} GiB"
    if torch.device(device).type == "cuda":
        text += f", GPU max allocated {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB"
    return text


# ------------------------------------------------------------------------------------------------
# 2. Data sets. The built-in `shapes` set, CIFAR-10 and folders of small images are held in
#    memory as uint8 tensors; other folders stay files, cropped image by image.
# ------------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


@dataclass
class ImageSet:
    """One split: labels, class names, and either the pixels (in memory) or the image files."""
    labels: torch.Tensor                  # (N,) int64
    classes: list
    images: torch.Tensor | None = None    # (N, 3, H, W) uint8, when held in memory
    files: list | None = None             # paths, when read from a folder (kept when held in memory)
    unreadable: list = field(default_factory=list)  # files that could not be read
    masks: torch.Tensor | None = None     # (N, H, W) bool (True: object) or read_labels maps, in memory
    mask_files: list | None = None        # one mask file per image file (MASKS_FOLDER), when known

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
    generator = torch.Generator().manual_seed(seed)
    parts = [draw_shapes(min(1000, n - start), generator, size, gray) for start in range(0, n, 1000)]
    return ImageSet(labels=torch.cat([p[1] for p in parts]), classes=list(SHAPES),
                    images=torch.cat([p[0] for p in parts]))


def draw_lattice(label: torch.Tensor, generator: torch.Generator, size: int, ss: int) -> torch.Tensor:
    """The lattice of each image's class (SHAPES[label]), drawn at ss px for images of size px:
    (n, 1, ss, ss), 1 inside a shape, 0 between. Period 7-11 px (of the size-px image), random
    rotation, offset and shape size, all independent of the class."""
    n = len(label)
    u01 = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    coords = (torch.arange(ss) + 0.5) / ss  # pixel centres in [0, 1]
    y, x = coords[:, None], coords[None, :]
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
    return mask


def draw_shapes(n: int, generator: torch.Generator, size: int, gray: bool = True):
    u01 = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    label = torch.randint(len(SHAPES), (n,), generator=generator)
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
    mask = draw_lattice(label, generator, size, ss)
    img = background * (1 - mask) + fg * mask
    img = img + 0.03 * torch.randn(img.shape, generator=generator)  # sensor noise
    img = F.avg_pool2d(img, 2)  # (n, 3, size, size)
    img = (img.clamp(0, 1) * 255).round()
    if gray:  # shades of gray: the colours' channel mean
        img = img.mean(1, keepdim=True).round().expand(-1, 3, -1, -1)
    return img.to(torch.uint8).contiguous(), label  # (n, 3, size, size), (n,)


OBJECTS_SIZE = 64  # px: at 32 px an object held 1-2 lattice periods, and the class hardly showed


def make_objects(n: int, seed: int, size: int = OBJECTS_SIZE) -> ImageSet:
    """The built-in set with an object and a background: a blob filled with its class's lattice
    (the 8 lattices of `shapes`) on a background of smooth clutter, with the object's mask.

    The class shows only inside the object: the background (a gray level with low-frequency
    blotches) is drawn independently of the class, so a feature that knows the class has to look
    at the object; the mask (N, H, W) is the ground truth for the attention's Jaccard (paper
    Section 4.2.1). The object is an ellipse whose radius wobbles with the angle, at a random
    place, size (20-45 % of the frame's area before the frame cuts it) and elongation. Gray, as
    `shapes`. Deterministic for a seed; drawn 1000 images at a time.
    """
    generator = torch.Generator().manual_seed(seed)
    parts = [draw_objects(min(1000, n - start), generator, size) for start in range(0, n, 1000)]
    return ImageSet(labels=torch.cat([p[1] for p in parts]), classes=list(SHAPES),
                    images=torch.cat([p[0] for p in parts]), masks=torch.cat([p[2] for p in parts]))


def posed_frame(n: int, generator: torch.Generator, ss: int, centre: tuple, area: tuple,
                stretch: tuple, unit_area):
    """Each image's object frame (u, v), (n, ss, ss) over the ss-px pixel centres: a centre (c_x, c_y)
    drawn in [low, low + span) of each side (centre = (low, span)), an area A (share of the frame),
    a stretch e and a rotation θ; the radius r = sqrt(A / a) scales a shape of unit area a to A:
    u = R_θ(x − c)_1 / (r √e), v = R_θ(x − c)_2 √e / r."""
    u01 = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    coords = (torch.arange(ss) + 0.5) / ss  # pixel centres in [0, 1]
    y, x = coords[:, None], coords[None, :]
    cx, cy = centre[0] + centre[1] * u01(n, 1, 1), centre[0] + centre[1] * u01(n, 1, 1)
    a = area[0] + area[1] * u01(n, 1, 1)
    e = stretch[0] + stretch[1] * u01(n, 1, 1)
    rot = u01(n, 1, 1) * 2 * math.pi
    radius = (a / unit_area).sqrt()
    du, dv = x - cx, y - cy
    u = (du * torch.cos(rot) + dv * torch.sin(rot)) / (radius * e.sqrt())
    v = (-du * torch.sin(rot) + dv * torch.cos(rot)) * e.sqrt() / radius
    return u, v


def draw_objects(n: int, generator: torch.Generator, size: int):
    u01 = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    label = torch.randint(len(SHAPES), (n,), generator=generator)
    ss = 2 * size  # draw at twice the size, then average 2x2 pixels (anti-aliasing)
    # the silhouette: a disk's frame posed at random (centre, area 20-45 %, elongation, rotation),
    # and a radius that wobbles with the angle φ: ρ(φ) = 1 + w_2 cos(2φ + p_2) + w_3 cos(3φ + p_3)
    u, v = posed_frame(n, generator, ss, centre=(0.3, 0.4), area=(0.2, 0.25), stretch=(0.7, 0.6),
                       unit_area=math.pi)
    phi = torch.atan2(v, u)
    w, phase = 0.12 * u01(n, 2, 1, 1), 2 * math.pi * u01(n, 2, 1, 1)
    rho = 1 + w[:, 0] * torch.cos(2 * phi + phase[:, 0]) + w[:, 1] * torch.cos(3 * phi + phase[:, 1])
    inside = ((u ** 2 + v ** 2).sqrt() <= rho).unsqueeze(1).float()  # (n, 1, ss, ss)
    # the class: its lattice, ink f on the object's gray o, one dark (0.1-0.3) and one light
    # (0.7-0.9), which is which at random. Gray levels drawn per image from the whole range (as
    # in v3 of this set) gave every crop of an image the same two levels, and DINO matched
    # views by them: its features told images apart by their grays, not their class
    lattice = draw_lattice(label, generator, size, ss)
    dark, light = 0.1 + 0.2 * u01(n, 1, 1, 1), 0.7 + 0.2 * u01(n, 1, 1, 1)
    swap = u01(n, 1, 1, 1) < 0.5
    o, f = torch.where(swap, light, dark), torch.where(swap, dark, light)
    obj = o + (f - o) * lattice
    # the background, independent of the class: smooth blotches around mid-gray (6 x 6 random
    # values upsampled bicubically: no period, no edges, nothing a lattice has); its level varies
    # inside an image, not from image to image, for the reason above
    g, amplitude = 0.5, 0.15 + 0.2 * u01(n, 1, 1, 1)
    blotches = F.interpolate(torch.randn(n, 1, 6, 6, generator=generator), size=(ss, ss),
                             mode="bicubic", align_corners=False)
    img = inside * obj + (1 - inside) * (g + amplitude * blotches)
    img = img + 0.03 * torch.randn(img.shape, generator=generator)  # sensor noise
    img = (F.avg_pool2d(img, 2).clamp(0, 1) * 255).round()  # (n, 1, size, size)
    masks = F.avg_pool2d(inside, 2)[:, 0] >= 0.5  # (n, size, size): pixels at least half object
    return img.expand(-1, 3, -1, -1).to(torch.uint8).contiguous(), label, masks


def make_silhouettes(n: int, seed: int, size: int = OBJECTS_SIZE) -> ImageSet:
    """The built-in set whose classes are shapes: one silhouette of the 8 SHAPES per image, filled
    flat at a fixed dark gray, on fine clutter at a fixed amplitude, with the object's mask.

    Designed, before any attention was measured on it, so that nothing but the object's outline
    tells the class or the image (docs/segmentation.md, "The silhouettes set"):
    - the class is the shape, at a random place, rotation, size, stretch and warp; every shape
      is scaled to the drawn area, so the size says nothing of the class, and the fill is one
      flat gray, so a patch inside the object looks the same in every image of every class;
    - the background is grain of about 2 px (finer than a patch) at one amplitude around one
      level: no per-image level, amplitude or low-frequency layout that the views of one image
      share and other images lack (what DINO matched views by on `objects`);
    - the object covers 15-30 % of the frame (a PASCAL VOC object's share), its centre in the
      middle 30 % of each side, so a global crop (40-100 % of the image) usually holds it.
    Gray, as `shapes`. Deterministic for a seed; drawn 1000 images at a time.
    """
    generator = torch.Generator().manual_seed(seed)
    parts = [draw_silhouettes(min(1000, n - start), generator, size) for start in range(0, n, 1000)]
    return ImageSet(labels=torch.cat([p[1] for p in parts]), classes=list(SHAPES),
                    images=torch.cat([p[0] for p in parts]), masks=torch.cat([p[2] for p in parts]))


def shape_area(shape: str, grid: int = 512) -> float:
    """The area of shape_mask in its own frame (radius 1), counted on a grid over [-1.2, 1.2]²."""
    t = (torch.arange(grid) + 0.5) / grid * 2.4 - 1.2
    return shape_mask(shape, t[None, :], t[:, None]).float().mean().item() * 2.4 ** 2


def draw_silhouettes(n: int, generator: torch.Generator, size: int):
    u01 = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    label = torch.randint(len(SHAPES), (n,), generator=generator)
    ss = 2 * size  # draw at twice the size, then average 2x2 pixels (anti-aliasing)
    # the pose: centre in the middle 30 %, area 15-30 %, stretch 0.8-1.25; each shape's unit area
    # a_k scaled to the drawn area
    unit_area = torch.tensor([shape_area(s) for s in SHAPES])[label].view(n, 1, 1)
    u, v = posed_frame(n, generator, ss, centre=(0.35, 0.3), area=(0.15, 0.15), stretch=(0.8, 0.45),
                       unit_area=unit_area)
    # the warp: each frame coordinate bent by a slow wave of the other, u ← u + w sin(2v + p)
    w, phase = 0.1 * u01(n, 2, 1, 1), 2 * math.pi * u01(n, 2, 1, 1)
    u, v = u + w[:, 0] * torch.sin(2 * v + phase[:, 0]), v + w[:, 1] * torch.sin(2 * u + phase[:, 1])
    inside = torch.zeros(n, 1, ss, ss)
    for k in range(len(SHAPES)):
        i = label == k
        inside[i] = shape_mask(SHAPES[k], u[i], v[i]).unsqueeze(1).float()
    # the background: grain of 2 px (noise drawn at half the size, upsampled), one level and one
    # amplitude for every image; the object: one flat gray, 0.35 below the background's level
    grain = F.interpolate(torch.randn(n, 1, size // 2, size // 2, generator=generator),
                          size=(ss, ss), mode="bilinear", align_corners=False)
    level, amplitude, fill = 0.6, 0.12, 0.25
    img = inside * fill + (1 - inside) * (level + amplitude * grain / grain.std())
    img = img + 0.03 * torch.randn(img.shape, generator=generator)  # sensor noise
    img = (F.avg_pool2d(img, 2).clamp(0, 1) * 255).round()  # (n, 1, size, size)
    masks = F.avg_pool2d(inside, 2)[:, 0] >= 0.5  # (n, size, size): pixels at least half object
    return img.expand(-1, 3, -1, -1).to(torch.uint8).contiguous(), label, masks


BUILT_IN = {"shapes": make_shapes, "objects": make_objects,  # --data names of the generated sets
            "silhouettes": make_silhouettes}


class ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds only what CIFAR-10's files hold: dicts, lists, str, bytes, int
    and numpy arrays. Plain pickle.load runs whatever code a file names (a 'data set' from a
    mirror can run a shell command); this one refuses every other class before building it."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}  # how protocol 2 writes bytes: encode(str, "latin1")

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a data file never needs")


PICKLE_MAX_BYTES = 2 ** 30  # a CIFAR-10 batch is 30 MiB; a pickle is read whole into memory


def read_pickle(path: Path) -> dict:
    """One CIFAR-10 file through ArrayUnpickler; any failure is a one-line error naming the file."""
    try:
        regular_file(path, "CIFAR-10 file", PICKLE_MAX_BYTES)  # a named pipe would block open()
        with open(path, "rb") as f:
            obj = ArrayUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise DinoError(f"{path} is missing; the CIFAR-10 folder is incomplete: extract "
                        f"cifar-10-python.tar.gz into {path.parent.parent} again") from None
    except DinoError:
        raise
    except Exception as e:  # refused classes, truncated files, garbage: all one message
        raise DinoError(f"{path} is not a readable CIFAR-10 file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'no message'}); replace it "
                        f"with a fresh copy") from None
    require(isinstance(obj, dict), f"{path} is not a CIFAR-10 file (it holds a "
                                   f"{type(obj).__name__}, not a dict); replace it with a fresh copy")
    return obj


def load_cifar10(root: Path) -> tuple[ImageSet, ImageSet]:
    """Read CIFAR-10's python pickles directly (torchvision's class rejects copies by md5)."""
    base = root / "cifar-10-batches-py"
    classes = read_pickle(base / "batches.meta").get("label_names")
    require(isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes),
            f"{base / 'batches.meta'} has no list of label_names (class names as text); replace "
            f"it with a fresh copy")

    def read(names):
        images, labels = [], []
        for name in names:
            batch = read_pickle(base / name)
            data, y = batch.get("data"), batch.get("labels")
            require(isinstance(data, np.ndarray) and data.ndim == 2 and data.shape[1] == 3072
                    and data.dtype == np.uint8 and isinstance(y, list) and len(y) == len(data),
                    f"{base / name} does not hold CIFAR-10's uint8 (N, 3072) data and N labels")
            check_labels(y, len(classes), base / name, f"the {len(classes)} label_names of batches.meta")
            images.append(torch.as_tensor(data))
            labels += y
        # each row holds 1024 red, 1024 green, then 1024 blue values, row-major
        images = rearrange(torch.cat(images), "n (c h w) -> n c h w", c=3, h=32, w=32)
        return ImageSet(labels=torch.tensor(labels), classes=classes, images=images.contiguous())

    return read([f"data_batch_{i}" for i in range(1, 6)]), read(["test_batch"])


def check_labels(labels, num_classes: int, path, names: str):
    """A one-line error naming `path` unless every label is a whole number in [0, num_classes):
    read when the data is loaded, not found by the k-NN after an epoch of training."""
    bad = next((v for v in labels if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer))
                or not 0 <= v < num_classes), None) if isinstance(labels, list) else None
    if bad is not None:
        shown = repr(bad) if len(repr(bad)) <= 40 else f"{repr(bad)[:40]}..."
        raise DinoError(f"{path} holds the label {shown} ({type(bad).__name__}), but labels must be "
                        f"whole numbers from 0 to {num_classes - 1}, one per name of {names}; "
                        f"replace it with a fresh copy")


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


def unreadable_error(path) -> DinoError:
    return DinoError(f"{path} could not be read as an image; remove or replace it, or run "
                     f"without --strict_data to skip unreadable files")


def image_file_ok(path) -> bool:
    """Whether a file found in a folder can be an image: a regular file (not a named pipe, which
    blocks, nor a link to nothing), not empty (an interrupted copy) and at most IMAGE_MAX_BYTES.
    Files that fail are skipped and named, as images that fail to decode are."""
    try:
        return regular_file(path, "image", IMAGE_MAX_BYTES) > 0
    except (DinoError, OSError):
        return False


def scan_folder(split_dir: Path, classes: list | None = None, strict: bool = False) -> ImageSet:
    class_dirs = sorted(d for d in split_dir.iterdir() if d.is_dir() and visible(d))
    if not class_dirs:
        raise DinoError(f"{split_dir} has no class folders; expected {split_dir}/<class>/<image>")
    classes = classes or [d.name for d in class_dirs]
    files, labels, unreadable = [], [], []
    for d in class_dirs:
        require(d.name in classes, f"class folder {d} is not among the training classes")
        entries = sorted(f for f in d.iterdir() if visible(f))
        images = [f for f in entries if f.suffix.lower() in IMAGE_EXTENSIONS]
        below = [f for f in entries if f.is_dir()]
        require(images, f"class folder {d} holds no images" + (
            f" directly (they may be in its subfolders, such as {below[0].name}/: move them up "
            f"into {d}/)" if below else "; remove the folder or add its images"))
        for f in images:
            if not image_file_ok(f):  # skipped, and named in the log
                if strict:
                    raise unreadable_error(f)
                unreadable.append(str(f))
                continue
            files.append(str(f))
            labels.append(classes.index(d.name))
    if not files:
        raise DinoError(f"no images found under {split_dir} (looked for "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
    return ImageSet(labels=torch.tensor(labels), classes=classes, files=files, unreadable=unreadable)


# A folder without the train/<class>/ layout has no labels: its images form one class of this name
# (a name no folder is given), so the code that needs labels can tell (has_labels).
NO_LABELS = "(no labels)"


def has_labels(data: ImageSet) -> bool:
    return data.classes != [NO_LABELS]


def has_class_folders(split_dir: Path) -> bool:
    """Whether split_dir is a labelled split: a folder with subfolders (one per class)."""
    return split_dir.is_dir() and any(d.is_dir() and visible(d) for d in split_dir.iterdir())


def scan_images(root: Path, exclude: tuple = (), strict: bool = False) -> ImageSet:
    """Every image file under root, at any depth, in sorted path order, as one data set without
    labels (one class, NO_LABELS). Folders in `exclude` (a labelled val/ beside) and hidden files
    and folders (.git, .thumbnails: `visible`) are left out; empty files, broken links, named
    pipes and files over IMAGE_MAX_BYTES are skipped and named, as scan_folder does; images that
    fail to decode are found later, where they are read."""
    files, unreadable = [], []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if visible(d) and Path(folder, d) not in exclude]
        for name in names:
            path = Path(folder, name)
            if path.suffix.lower() not in IMAGE_EXTENSIONS or not visible(path):
                continue
            ok = image_file_ok(path)
            if not ok and strict:
                raise unreadable_error(path)
            (files if ok else unreadable).append(path)
    if not files:
        raise DinoError(f"no images found under {root}: it has no train/ folder of classes and no "
                        f"image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in it or its subfolders")
    return ImageSet(labels=torch.zeros(len(files), dtype=torch.long), classes=[NO_LABELS],
                    files=[str(f) for f in sorted(files)], unreadable=[str(f) for f in sorted(unreadable)])


def locate(path: str) -> tuple[str, str, Path | None]:
    """(name, kind, root) of a --data value, kind one of shapes, cifar10, folder (train/<class>/
    layout), classes (a folder of class folders only: the authors' imagenet/train pointed at
    directly) or images (any other folder: its images, without labels); one-line errors for paths
    that are none of them. Reads no image."""
    if path in BUILT_IN:
        return path, path, None
    root = Path(path).expanduser()
    looks_like_cifar = "cifar" in root.name.lower().replace("-", "")
    if (root / "cifar-10-batches-py").is_dir() or (
            looks_like_cifar and (not root.exists() or (root.is_dir() and not any(root.iterdir())))):
        return "cifar10", "cifar10", root
    require(root.exists(), f"data path {root} does not exist; pass --data shapes for the built-in "
                           f"set, a CIFAR-10 folder, or a folder of images")
    require(root.is_dir(), f"data path {root} is not a folder")
    name = root.name or "images"
    if has_class_folders(root / "train"):
        return name, "folder", root
    return name, "classes" if only_class_folders(root) else "images", root


def only_class_folders(root: Path) -> bool:
    """Whether root holds nothing but 2 or more class folders, each with images in it (not under
    subfolders): the authors' ImageNet train/ (n01440764/*.JPEG, ...). Such a folder is read as
    labelled, its subfolders the classes, rather than as one set of unlabelled images: the labels
    cost DINO nothing (it does not read them) and give the k-NN monitor its classes."""
    entries = [e for e in root.iterdir() if visible(e)]
    folders = [e for e in entries if e.is_dir()]
    return (len(folders) >= 2 and len(folders) == len(entries)
            and not {"train", "val", "test", MASKS_FOLDER} & {f.name for f in folders}
            and all(any(f.suffix.lower() in IMAGE_EXTENSIONS for f in d.iterdir()) for d in folders))


def split_beside(root: Path) -> Path | None:
    """The labelled val/ (or test/) beside a folder of class folders: imagenet/val for imagenet/train."""
    return next((root.parent / s for s in ("val", "test")
                 if root.parent / s != root and has_class_folders(root.parent / s)), None)


def labelled_beside(root: Path) -> list[Path]:
    """The labelled val/ and test/ folders of an unlabelled folder: held out of its training images;
    the first is its evaluation split."""
    return [root / split for split in ("val", "test") if has_class_folders(root / split)]


def peek(path: str) -> tuple[str, int]:
    """(name, typical image side) of a --data value without loading it: what the preset needs."""
    name, kind, root = locate(path)
    if kind in ("shapes", "objects", "silhouettes", "cifar10"):
        return name, OBJECTS_SIZE if kind in ("objects", "silhouettes") else 32
    if kind == "images":
        return name, probe_image_size(scan_images(root, tuple(labelled_beside(root))))
    return name, probe_image_size(scan_folder(root if kind == "classes" else root / "train"))


def load_data(path: str, strict: bool = False) -> tuple[str, ImageSet, ImageSet | None]:
    """(name, training split, evaluation split or None) for any supported --data. A folder without
    train/<class>/ gives all its images without labels (has_labels is False), evaluated on a
    labelled val/ or test/ beside them if there is one."""
    name, kind, root = locate(path)
    if kind in BUILT_IN:
        return name, BUILT_IN[kind](10_000, seed=0), BUILT_IN[kind](2_000, seed=1)
    if kind == "cifar10":
        if not (root / "cifar-10-batches-py").is_dir():
            download_cifar10(root)
        return name, *load_cifar10(root)
    if kind == "images":
        beside = labelled_beside(root)
        train_set = hold_in_memory(scan_images(root, tuple(beside) + (root / MASKS_FOLDER,), strict),
                                   strict=strict)
        eval_set = hold_in_memory(with_masks(scan_folder(beside[0], strict=strict), root),
                                  strict=strict) if beside else None
        return name, train_set, eval_set
    if kind == "classes":  # its subfolders are the classes; evaluated on a val/ beside it, if any
        train_set, beside = hold_in_memory(scan_folder(root, strict=strict), strict=strict), split_beside(root)
        return name, train_set, beside and hold_in_memory(
            with_masks(scan_folder(beside, train_set.classes, strict), root.parent), strict=strict)
    train_set = hold_in_memory(scan_folder(root / "train", strict=strict), strict=strict)
    eval_set = None
    for split in ("val", "test"):
        if (root / split).is_dir():
            eval_set = hold_in_memory(with_masks(scan_folder(root / split, train_set.classes, strict), root),
                                      strict=strict)
            break
    return name, train_set, eval_set


# Ground-truth masks of a folder's evaluation images: ROOT/masks/<the image's path under ROOT, with
# the suffix .png>, e.g. ROOT/val/dog/001.jpg → ROOT/masks/val/dog/001.png; nonzero = foreground.
MASKS_FOLDER = "masks"


def with_masks(split: ImageSet, root: Path) -> ImageSet:
    """split with mask_files set when ROOT/masks holds a mask for each of its images; unchanged
    when it holds none; a one-line error when only some images have one."""
    folder = root / MASKS_FOLDER
    if not folder.is_dir():
        return split
    paths = [folder / Path(f).relative_to(root).with_suffix(".png") for f in split.files]
    missing = [p for p in paths if not p.is_file()]
    if len(missing) == len(paths):
        return split
    if missing:
        raise DinoError(f"{folder} holds masks for {len(paths) - len(missing)} of the {len(paths)} "
                        f"evaluation images but not for {missing[0]} ({len(missing)} missing); give "
                        f"every evaluation image a mask, or none")
    for image, mask in zip(split.files, paths):  # headers only: sizes, before any work
        try:
            with open_image(image) as im:
                size = displayed_size(im)
        except (DinoError, *UNREADABLE):
            continue  # an unreadable image is left out, and its mask with it
        try:
            with open_image(mask) as m:
                require_mask_fits(mask, m.size, image, size)
        except UNREADABLE:
            raise DinoError(f"mask {mask} could not be read as an image; replace it") from None
    return dataclasses.replace(split, mask_files=[str(p) for p in paths])


def masked_images(path: str) -> ImageSet | None:
    """Every image of a folder (any depth) whose ROOT/masks/ holds a mask for each: the
    segmentation measures' images where there are no labels; None for other data."""
    _, kind, root = locate(path)
    if kind != "images" or not (root / MASKS_FOLDER).is_dir():
        return None
    masked = with_masks(scan_images(root, (root / MASKS_FOLDER,)), root)
    return hold_in_memory(masked) if masked.mask_files is not None else None


def require_mask_fits(mask, mask_size: tuple, image, image_size: tuple):
    """The one check of a mask against its image, for masks in memory and as files alike;
    sizes as (width, height), the image's as read_rgb turns it upright. A mask of the image's
    shape at another resolution fits (fit_mask resizes it): scaled to the image's width or
    height, its other side is the image's within one of the mask's pixels."""
    (w, h), (W, H) = mask_size, image_size
    same_shape = abs(h * W / w - H) <= W / w + 0.5 or abs(w * H / h - W) <= H / h + 0.5
    require(same_shape, f"mask {mask} is {w}x{h} px, its image {image} {W}x{H} px; a mask must "
                        f"have its image's size, or its shape at another resolution")


def fit_mask(labels: torch.Tensor, image_size: tuple) -> torch.Tensor:
    """A mask (H, W) at its image's (width, height): resized with nearest neighbour (labels stay
    labels) where it was drawn at another resolution (require_mask_fits allows that)."""
    W, H = image_size
    if tuple(labels.shape) == (H, W):
        return labels
    return F.interpolate(labels[None, None].float(), size=(H, W), mode="nearest")[0, 0].to(labels.dtype)


VOID = 255  # in a palette mask, pixels scored by no measure (PASCAL VOC's object outlines)


def read_labels(path) -> torch.Tensor:
    """A mask file as an (H, W) uint8 label map: 0 background, 1 … 254 one object each, VOID
    not scored. A palette PNG (PASCAL VOC's class or instance masks) gives its palette indices,
    one object per index; any other image (binary, grayscale, RGB) is one object: nonzero in
    any channel."""
    try:
        with open_image(path) as im:
            palette = im.mode == "P"
            m = torch.as_tensor(np.array(im))
    except UNREADABLE:
        raise DinoError(f"mask {path} could not be read as an image; replace it") from None
    if palette:
        return m.to(torch.uint8)
    return m.reshape(*m.shape[:2], -1).ne(0).any(-1).to(torch.uint8)


def read_mask(path) -> torch.Tensor:
    """A mask file as (H, W) bool: every object's pixels (read_labels > 0, VOID left out)."""
    labels = read_labels(path)
    return (labels > 0) & (labels != VOID)


def hold_in_memory(data: ImageSet, max_side: int = 64, max_bytes: int = 4 * 2 ** 30,
                   strict: bool = False) -> ImageSet:
    """Decode a folder of small images of one size (e.g. CIFAR-10 as JPEGs) into one uint8
    tensor, so it trains on the fast in-memory path; any other folder stays as files."""
    try:
        side = probe_image_size(data)
    except DinoError:  # unreadable files: leave them to the per-image path, which reports them
        return data
    if side > max_side or len(data) * 3 * side * side > max_bytes:
        return data
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        images = list(pool.map(read_rgb, data.files, chunksize=256))
    if strict and None in images:
        raise unreadable_error(data.files[images.index(None)])
    sizes = {im.size for im in images if im is not None}
    if len(sizes) != 1:
        return data  # sizes differ: crop each image on its own, in the DataLoader
    keep = [i for i, im in enumerate(images) if im is not None]
    masks = None
    if data.mask_files is not None:
        fitted = []
        for i in keep:
            m = read_labels(data.mask_files[i])
            require_mask_fits(data.mask_files[i], m.shape[::-1], data.files[i], images[i].size)
            fitted.append(fit_mask(m, images[i].size))
        masks = torch.stack(fitted)  # (n, H, W)
    return ImageSet(labels=data.labels[keep], classes=data.classes, files=[data.files[i] for i in keep],
                    images=torch.stack([pil_to_tensor(images[i]) for i in keep]),  # (n, 3, H, W)
                    unreadable=data.unreadable + [data.files[i] for i, im in enumerate(images) if im is None],
                    masks=masks, mask_files=None if masks is None else [data.mask_files[i] for i in keep])


def probe_image_size(data: ImageSet) -> int:
    """The typical shorter side of the images (the median of the first 20 readable ones)."""
    if data.images is not None:
        return min(data.images.shape[-2:])
    sides = []
    for f in data.files[:20]:
        try:
            with open_image(f) as im:
                sides.append(min(im.size))
        except (DinoError, *UNREADABLE):
            continue
    if sides:
        return sorted(sides)[len(sides) // 2]
    raise DinoError(f"none of the first images under {Path(data.files[0]).parent.parent} "
                    f"could be read; are they images?")


# ------------------------------------------------------------------------------------------------
# 3. Feeding images: the epoch's order, folders cropped per image in workers, evaluation views.
# ------------------------------------------------------------------------------------------------

class FolderMultiCrop(torch.utils.data.Dataset):
    """Per-image geometry for image folders. An item is (position in the epoch, image index);
    its crops are drawn from a generator seeded by (seed, epoch, position), so they do not depend
    on the number of workers or processes, nor on where a resumed run picked up. An unreadable
    image is replaced by the next readable one (the batch keeps its size, so processes stay in
    step) and its path is returned, to be named in the log."""

    def __init__(self, data: ImageSet, crops: list, seed: int, epoch: int):
        self.files, self.labels = data.files, data.labels
        self.crops = crops  # one torchvision RandomResizedCrop per view
        self.seed, self.epoch = seed, epoch

    def __len__(self):
        return len(self.files)

    def __getitem__(self, item):
        position, i = item
        torch.manual_seed(derive_seed(self.seed, "folder_crops", self.epoch, position))
        # only the item's own file is named: a stand-in that fails too is named by its own item
        # (naming it here as well counted 3 files for 2, one of them twice)
        unreadable = []
        for k in range(len(self.files)):
            image = read_rgb(self.files[(i + k) % len(self.files)])
            if image is not None:
                return [pil_to_tensor(crop(image)) for crop in self.crops], unreadable
            unreadable = [self.files[i]]
        return None, unreadable


# what PIL raises for a file that is no image, a damaged one, or a decompression bomb (an image
# whose header claims billions of pixels: not an OSError)
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


# An image file may have at most this many bytes: a 50-megapixel photo is 10-30 MB as a JPEG,
# a 16-bit 40-megapixel TIFF 240 MB; a bigger file is refused (a single --image) or skipped and
# named (in a folder) without being opened, since PIL would scan or decode it for minutes.
IMAGE_MAX_BYTES = 256 * 2 ** 20
# PIL's header parsers skip junk one byte a read: a JPEG header followed by gigabytes of zeros
# kept Image.open busy for hours. A real header (markers, chunks, tags) takes a few hundred reads.
HEADER_READS = 20_000


class _ReadBudget:
    """A file object that answers end-of-file after `left` reads, while Image.open reads the header."""

    def __init__(self, f, left: int):
        self.f, self.left = f, left

    def read(self, n=-1):
        if self.left is not None:
            if self.left <= 0:
                return b""
            self.left -= 1
        return self.f.read(n)

    def __getattr__(self, name):  # seek, tell, fileno, ...: the file's own
        return getattr(self.f, name)


@contextlib.contextmanager
def open_image(path):
    """Image.open for any file a user names, in bounded time: a regular file of at most
    IMAGE_MAX_BYTES (a DinoError that says which it is not), whose header PIL reads within
    HEADER_READS reads (else an UNREADABLE error). The one place image files are opened."""
    regular_file(path, "image", IMAGE_MAX_BYTES)
    with open(path, "rb") as f:
        budget = _ReadBudget(f, HEADER_READS)
        with Image.open(budget) as im:
            budget.left = None  # the header is read; decoding reads in large blocks
            yield im


def displayed_size(im) -> tuple[int, int]:
    """(width, height) of an opened image as read_rgb returns it: EXIF orientations 5-8 (a
    camera held sideways) swap the sides."""
    w, h = im.size
    return (h, w) if im.getexif().get(0x0112) in (5, 6, 7, 8) else (w, h)


def read_rgb(path):
    """An image as 8-bit RGB (grayscale, palette, RGBA and 16-bit converted), turned upright as
    its EXIF orientation says (as image viewers show it), or None if unreadable."""
    try:
        with open_image(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                im = im.point(lambda v: v / 256).convert("L")
            return im.convert("RGB")
    except (DinoError, *UNREADABLE):
        return None


def collate_views(items):
    """Stack view k of every image; collect the files that could not be read."""
    unreadable = [path for _, paths in items for path in paths]
    if any(views is None for views, _ in items):
        raise DinoError(f"no image in the training folder could be read ({unreadable[0]} and "
                        f"{len(unreadable) - 1} more); is --data a folder of images?")
    return [torch.stack(vs) for vs in zip(*(views for views, _ in items))], unreadable


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the images in one epoch: a pure function of (seed, epoch)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "epoch_order", epoch))
    return torch.randperm(n, generator=generator)


def leave_ctrl_c_to_the_main_process(worker_id):
    # Ctrl-C reaches every process of the terminal; the main one finishes its step and saves,
    # which needs the workers alive until then
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def eval_batches(data: ImageSet, size: int, batch_size: int = 256):
    """(images, labels) batches of centre views at the training resolution, for feature extraction."""
    if data.images is not None:
        for start in range(0, len(data), batch_size):
            x = data.images[start:start + batch_size].float() / 255
            if x.shape[-1] != size or x.shape[-2] != size:
                x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True).clamp(0, 1)
            yield normalize(x), data.labels[start:start + batch_size]
        return
    resize = round(size * 256 / 224) if size >= 96 else size  # the authors' 256 → 224 centre crop
    centre_view = transforms.Compose([
        transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
        transforms.CenterCrop(size), transforms.PILToTensor()])
    dataset = _EvalFolder(data, centre_view)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=2)
    for x, y, ok in loader:
        yield normalize(x[ok].float() / 255), y[ok]


def mask_batches(data: ImageSet, size: int, batch_size: int = 256):
    """(images, masks) batches: the centre views of eval_batches and their ground-truth masks
    (B, size, size), bool or label maps (read_labels), cut and resized as the images are
    (nearest neighbour: labels stay labels). Needs data.masks (in memory) or data.mask_files;
    unreadable images are left out."""
    if data.images is not None:
        for (x, _), start in zip(eval_batches(data, size, batch_size), range(0, len(data), batch_size)):
            m = data.masks[start:start + batch_size]  # (B, H, W)
            if m.shape[-2:] != (size, size):
                m = F.interpolate(m[:, None].float(), size=(size, size), mode="nearest")[:, 0].to(m.dtype)
            yield x, m
        return
    resize = round(size * 256 / 224) if size >= 96 else size  # as eval_batches
    cut = transforms.Compose([transforms.Resize(resize, interpolation=transforms.InterpolationMode.NEAREST),
                              transforms.CenterCrop(size)])
    numbered = dataclasses.replace(data, labels=torch.arange(len(data)))

    def mask(i):  # at its image's size, then cut as the image is
        with open_image(data.files[i]) as im:
            image_size = displayed_size(im)
        return cut(fit_mask(read_labels(data.mask_files[i]), image_size)[None])[0]

    for x, index in eval_batches(numbered, size, batch_size):
        yield x, torch.stack([mask(i) for i in index.tolist()])


class _EvalFolder(torch.utils.data.Dataset):
    """(centre view, label, readable) of each file; an unreadable file gives a blank view that
    eval_batches drops."""

    def __init__(self, data, centre_view):
        self.data, self.centre_view = data, centre_view

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        image = read_rgb(self.data.files[i])
        if image is None:
            return torch.zeros(3, *self.centre_view.transforms[1].size, dtype=torch.uint8), -1, False
        return self.centre_view(image), int(self.data.labels[i]), True


def shard(data: ImageSet, rank: int, world: int) -> ImageSet:
    """This process's contiguous share of a split, for feature extraction."""
    if world == 1:
        return data
    idx = torch.tensor_split(torch.arange(len(data)), world)[rank]
    return ImageSet(labels=data.labels[idx], classes=data.classes,
                    images=None if data.images is None else data.images[idx],
                    files=None if data.files is None else [data.files[i] for i in idx.tolist()],
                    masks=None if data.masks is None else data.masks[idx],
                    mask_files=None if data.mask_files is None else [data.mask_files[i] for i in idx.tolist()])
