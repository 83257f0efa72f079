"""Checkpoint files and weight loading: the one home for both.

  1. files: written atomically with a checksum of their tensors, read with weights_only=True,
     every failure a one-line DinoError
  2. backbones: a ViT out of any file DINO weights come in (this project's checkpoints and
     exports, the authors' released backbones and full training checkpoints), sized from the
     weights' shapes (load_backbone; knn_eval.py, visualize.py and hubconf.py use it)
  3. warm start (dino.py --init_from): student, teacher and center out of such a file
"""

import argparse
import hashlib
import math
import os
import pickle
import stat
import warnings
import zipfile
from pathlib import Path

import torch

import vit
from data import DinoError, regular_file, require


# ------------------------------------------------------------------------------------------------
# 1. Files.
# ------------------------------------------------------------------------------------------------

def checksum(obj) -> str:
    """SHA-256 of every tensor in a (nested) state, in a fixed order: what load_checkpoint checks."""
    digest = hashlib.sha256()

    def visit(x):
        if torch.is_tensor(x):
            digest.update(str((x.dtype, tuple(x.shape))).encode())
            digest.update(x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            for key in sorted(x, key=str):
                digest.update(str(key).encode())
                visit(x[key])
        elif isinstance(x, (list, tuple)):
            for item in x:
                visit(item)

    visit(obj)
    return digest.hexdigest()


def save_checkpoint(state: dict, path: Path, with_checksum: bool = True):
    """Write atomically: to a temporary file, flushed and fsynced, then renamed over the old one,
    with a checksum of the tensors (with_checksum=False for a plain state dict that other code
    loads strictly). If the write fails (a full disk, say), the temporary file is removed, the
    previous file stays as it was, and a one-line DinoError says what failed. Only a regular file
    is ever replaced: a device, a FIFO or a folder at the path (or at its temporary name) is an
    error, and the temporary file is created afresh, never written through a symlink."""
    path = Path(path)
    tmp = check_writable(path)
    try:
        tmp.unlink(missing_ok=True)  # a file (or symlink) an interrupted save left
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            torch.save({**state, "checksum": checksum(state)} if with_checksum else state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        if tmp.is_symlink() or tmp.is_file():
            tmp.unlink(missing_ok=True)
        cause = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        kept = "the previous file is kept" if path.exists() else "no earlier file exists"
        raise DinoError(f"could not write {path}: {cause}; {kept}") from None


def check_writable(path: Path) -> Path:
    """A one-line error where save_checkpoint could not write path without harm: something other
    than a regular file at the path, or other than a file (or symlink) at its temporary name.
    dino.py calls it before training, so the first save does not find out after an epoch.
    Returns the temporary name."""
    tmp = path.with_name(path.name + ".tmp")
    if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):
        raise DinoError(f"could not write {path}: it is {kind_of_file(path)}, not a regular file, "
                        f"and is left as it is; give a file name")
    if os.path.lexists(tmp) and not (tmp.is_symlink() or stat.S_ISREG(os.lstat(tmp).st_mode)):
        raise DinoError(f"could not write {path}: {tmp}, its temporary name, is {kind_of_file(tmp)} "
                        f"(not a file an interrupted save left); move it away")
    return tmp


def kind_of_file(path) -> str:
    """'a folder', 'a device', 'a FIFO', ... for a path that exists (symlinks followed, unless broken)."""
    mode = os.stat(path).st_mode if os.path.exists(path) else os.lstat(path).st_mode
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a broken symlink"))
    return next((name for test, name in kinds if test(mode)), "a special file")


def first_non_finite(tensors: dict, prefix: str = "") -> str | None:
    """The name of the first floating-point tensor holding NaN or ±inf in a (nested) dict of
    tensors (a state dict, an optimizer's state), or None when all are finite."""
    for key, value in tensors.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            found = first_non_finite(value, name + ".")
            if found:
                return found
        elif torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            return name
    return None


def load_checkpoint(path, map_location="cpu") -> dict:
    """torch.load(path, weights_only=True), every failure turned into a one-line DinoError.

    One class besides tensors and plain values is let in: argparse.Namespace, which the authors'
    full checkpoints hold under 'args'. Building one only sets attributes, and its values are
    unpickled under the same restrictions."""
    path = Path(path)
    try:
        regular_file(path, "file")  # a named pipe would block open() forever
    except OSError:
        raise DinoError(f"{path} does not exist or is not a file") from None
    with open(path, "rb") as f:
        first = f.read(1)
    # torch.save writes a zip archive (older releases: a pickle, whose first byte is 0x80)
    if not zipfile.is_zipfile(path) and first != b"\x80":
        raise DinoError(f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle "
                        f"as torch.save writes)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise DinoError(f"{path} holds more than tensors and plain values, so it is not loaded "
                        f"(unpickling it could run code): {str(e).splitlines()[0]}") from None
    except Exception as e:  # a damaged archive can fail in many ways inside torch.load
        raise DinoError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'no message'})") from None
    if isinstance(obj, dict) and "checksum" in obj:
        stored = obj.pop("checksum")
        require(stored == checksum(obj), f"{path} does not match its checksum: it was damaged after "
                                         f"it was written; restore a copy or delete it to start afresh")
    return obj


# ------------------------------------------------------------------------------------------------
# 2. Backbones: the one loader for this project's checkpoints and the authors' released files.
# ------------------------------------------------------------------------------------------------

def backbone_state_dict(obj, source: str, weights: str = "teacher") -> dict:
    """The ViT backbone's weights out of any layout DINO checkpoints come in.

    Accepted: a plain backbone dict (the authors' `dino_*_pretrain.pth`), or a full checkpoint
    with `teacher` / `student` dicts whose keys carry `module.` (DistributedDataParallel) and
    `backbone.` (MultiCropWrapper) prefixes: the authors' training checkpoints and this project's.
    The projection head (`head.*`) is dropped. `weights` picks the teacher (the network the paper
    evaluates and draws) or the student.
    """
    if isinstance(obj, dict) and ("teacher" in obj or "student" in obj):
        other = "student" if weights == "teacher" else "teacher"
        require(isinstance(obj.get(weights), dict), f"{source} has no {weights!r} weights; "
                                                    f"try --weights {other}")
        obj = obj[weights]
    require(isinstance(obj, dict), f"{source} holds a {type(obj).__name__}, not a state dict of a ViT")
    for key in ("state_dict", "model"):  # weights nested one level down, as some trainers save them
        require(not isinstance(obj.get(key), dict), f"{source} keeps its weights under the key "
                f"{key!r}; save torch.load(...)[{key!r}] to a file of its own and load that")
    state = {k.removeprefix("module."): v for k, v in obj.items() if torch.is_tensor(v)}
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    needed = ["cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight",
              "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight"]
    missing = [k for k in needed if k not in state]
    require(not missing, f"{source} holds no ViT backbone (no {', '.join(missing)}; its keys begin "
                         f"{', '.join(list(obj)[:3]) or 'none'}); only ViT backbones load here")
    return state


def vit_from_state_dict(state: dict, source: str, num_heads: int | None = None) -> vit.VisionTransformer:
    """The ViT these weights fit, sized from their shapes, with the weights loaded strictly.

    Width D from cls_token (1, 1, D), depth from the blocks, patch p from patch_embed.proj.weight
    (D, 3, p, p), training resolution S from pos_embed (1, (S/p)² + 1, D), MLP ratio from fc1.
    The weights do not show the number of heads (qkv is (3D, D) for any split): it comes from
    num_heads, else from ARCHS by width.
    """
    width = state["cls_token"].shape[-1]
    _, in_chans, patch, _ = state["patch_embed.proj.weight"].shape  # (D, 3, p, p)
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    side = math.isqrt(state["pos_embed"].shape[1] - 1)  # patches per side at the training size
    heads = num_heads or {dim: h for dim, _, h in vit.ARCHS.values()}.get(width)
    known = ", ".join(f"{name} {dim}" for name, (dim, _, _) in vit.ARCHS.items())
    require(heads is not None, f"{source}: ViT width {width} is none of the known sizes ({known}); "
                               f"give --num_heads")
    require(width % heads == 0, f"{source}: width {width} does not split into {heads} heads")
    require(in_chans == 3, f"{source}: the ViT takes {in_chans} input channels; images are RGB")
    mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / width
    model = vit.VisionTransformer(img_size=side * patch, patch_size=patch, embed_dim=width, depth=depth,
                              num_heads=heads, mlp_ratio=mlp_ratio)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # the first specific line: the first line only names the class
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = (lines[1] if len(lines) > 1 else lines[0])[:160]
        raise DinoError(f"{source} does not fit a ViT of width {width}, depth {depth}, patch "
                        f"{patch}: {detail}") from None
    return model.eval()


def load_backbone(path, weights: str = "teacher", num_heads: int | None = None) -> vit.VisionTransformer:
    """A ViT backbone from a checkpoint of dino.py or from the authors' released weights.

    This project's checkpoints record the number of heads ("vit"); for other files it comes
    from num_heads or from the width.
    """
    return backbone_from(load_checkpoint(path), str(path), weights, num_heads)


def backbone_from(obj, source: str, weights: str = "teacher", num_heads: int | None = None):
    """load_backbone for an object already read from a file. Weights holding NaN or ±inf (a run
    that diverged) are refused: every feature, k-NN vote and attention map of them would be NaN.
    A num_heads other than the file's own record is refused; for a file without one (a plain
    export, the authors' backbones), a num_heads other than the usual one for its width is
    warned about: the weights cannot show the split (see vit_from_state_dict)."""
    recorded = obj.get("vit") if isinstance(obj, dict) and isinstance(obj.get("vit"), dict) else {}
    state = backbone_state_dict(obj, source, weights)
    bad = first_non_finite(state)
    require(bad is None, f"{source}: the {weights} backbone's weights hold NaN or infinite values "
                         f"({bad} first): the run that wrote them diverged; use a checkpoint from "
                         f"before it diverged, or train again (lower --lr, --precision fp32)")
    heads = recorded.get("num_heads")
    require(not (num_heads and heads and num_heads != heads),
            f"{source} was trained with {heads} attention heads (its 'vit' record), not "
            f"{num_heads}; leave num_heads out (or give {heads})")
    width = state["cls_token"].shape[-1]
    usual = {dim: h for dim, _, h in vit.ARCHS.values()}.get(width)
    if num_heads and not heads and usual and num_heads != usual:
        warnings.warn(f"{source}: {num_heads} heads asked for a ViT of width {width}, which has "
                      f"{usual} in every known size; the file does not record its heads, so they "
                      f"cannot be checked: if it was trained with {usual}, these features and "
                      f"attention maps are not the trained network's", stacklevel=3)
    return vit_from_state_dict(state, source, num_heads or heads)


# ------------------------------------------------------------------------------------------------
# 3. Warm start (dino.py --init_from).
# ------------------------------------------------------------------------------------------------

# Both heads normalise the last layer's rows, W_k = γ_k V_k / ‖V_k‖;
# the authors' with the deprecated torch.nn.utils.weight_norm (γ as weight_g, V as weight_v), this
# project's with its parametrizations, which keep the same two tensors under other names.
AUTHORS_LAST_LAYER = {
    "head.last_layer.weight_g": "head.last_layer.parametrizations.weight.original0",  # γ, (K, 1)
    "head.last_layer.weight_v": "head.last_layer.parametrizations.weight.original1",  # V, (K, bottleneck)
}
SHAPE_FLAGS = [  # the flags that set a tensor's shape, most specific first
    ("backbone.pos_embed", "--global_crops_size and --patch_size"),
    ("backbone.patch_embed", "--patch_size and --arch"), ("backbone.", "--arch"),
    ("head.last_layer", "--out_dim and --bottleneck_dim"),
    ("head.", "--hidden_dim, --bottleneck_dim and --use_bn_in_head")]


def warm_start_weights(obj, source: str) -> dict:
    """{"student", "teacher": state dicts with MultiCropWrapper keys, "center": c or None} out of
    a file's contents. A full checkpoint (teacher and student: the authors' or this project's)
    gives each network its own backbone and head (`module.` prefixes dropped, the last layer
    renamed from weight_g/weight_v) and the center c (the authors keep it in dino_loss). A
    backbone alone (dino_*_pretrain.pth, an export) starts both networks; heads stay as built."""
    full = isinstance(obj, dict) and ("teacher" in obj or "student" in obj)
    weights = {"center": None}
    for role in ("student", "teacher"):
        state = {"backbone." + k: v for k, v in backbone_state_dict(obj, source, role).items()}
        if full:
            named = {k.removeprefix("module."): v for k, v in obj[role].items() if torch.is_tensor(v)}
            state.update({AUTHORS_LAST_LAYER.get(k, k): v for k, v in named.items() if k.startswith("head.")})
        bad = first_non_finite(state)
        require(bad is None, f"--init_from {source}: the {role}'s {bad} holds NaN or infinite "
                             f"values (the run that wrote it diverged); start from another file")
        weights[role] = state
    if full:
        center = obj.get("center", (obj.get("dino_loss") or {}).get("center"))
        weights["center"] = center if torch.is_tensor(center) else None
    return weights


def load_warm_start(network, state: dict, source: str, role: str):
    """Copy state into a MultiCropWrapper: the whole backbone, and the whole head if the file has
    one. A one-line error names the first tensor that is left over, missing or shaped otherwise."""
    own = network.state_dict()
    for key, value in state.items():
        require(key in own, f"--init_from {source}: the {role}'s {key} has no place in this run's "
                            f"network; {shape_flags(key)}")
        require(value.shape == own[key].shape,
                f"--init_from {source}: the {role}'s {key} is {tuple(value.shape)} in the file but "
                f"{tuple(own[key].shape)} in this run's network; {shape_flags(key)}")
    parts = ("backbone.", "head.") if any(k.startswith("head.") for k in state) else ("backbone.",)
    missing = [k for k in own if k.startswith(parts) and k not in state]
    if missing:
        raise DinoError(f"--init_from {source}: the {role} has no {missing[0]} ({len(missing)} "
                        f"tensor(s) missing); {shape_flags(missing[0])}")
    network.load_state_dict({**own, **state}, strict=True)


def shape_flags(key: str) -> str:
    return next(f"set by {flags}" for prefix, flags in SHAPE_FLAGS if key.startswith(prefix))


def warm_start(student, teacher, center, path) -> tuple[torch.Tensor, str]:
    """--init_from: student and teacher (MultiCropWrapper networks) out of a file, and the center
    c from a full checkpoint; returns (c, what was loaded, in words). The optimizer, the
    schedules and the position are the caller's, and start afresh."""
    weights = warm_start_weights(load_checkpoint(path), path)
    for role, network in (("student", student), ("teacher", teacher)):
        load_warm_start(network, weights[role], path, role)
    if weights["center"] is not None:
        require(weights["center"].shape == center.shape,
                f"--init_from {path}: the center is {tuple(weights['center'].shape)} in the file "
                f"but {tuple(center.shape)} in this run; set by --out_dim")
        center = weights["center"].to(center.device, torch.float32)
    if any(k.startswith("head.") for k in weights["student"]):
        what = "student and teacher, backbones and heads" + (
            ", and the center" if weights["center"] is not None else "")
    else:
        what = "its backbone in student and teacher; the heads start from scratch"
    return center, what
