"""The DINO paper's evaluations of frozen features: weighted k-NN and a linear probe.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021, Section 4.1
(k-NN, linear). The weighted k-NN vote is Wu et al., "Unsupervised Feature Learning via
Non-Parametric Instance Discrimination", CVPR 2018. dino.py's end-of-run k-NN monitor calls
extract_features and knn_accuracy from this file, so both report the same number.

  python knn_eval.py --checkpoint runs/shapes/checkpoint.pth           # a checkpoint of dino.py
  python knn_eval.py --checkpoint runs/cifar10/checkpoint.pth --data ./cifar10 --linear
  python knn_eval.py --pretrained dino_deitsmall16_pretrain.pth --data /path/to/images
  python knn_eval.py --raw_pixels --data ./cifar10                     # pixels alone: 45.8 % (k=20)

The file reads: 1. features (a network's, or raw pixels)  2. weighted k-NN  3. linear probe
4. loading weights (this project's checkpoints, the authors' released ones)  5. command line.

Where this knowingly differs from the authors' eval_knn.py and eval_linear.py:
- any number of classes and any number of test images (theirs assumes 1000 classes and breaks
  below 100 test images), compared in chunks so memory stays bounded, on CPU or GPU;
- the linear probe trains on features extracted once, from centre views without augmentation,
  so it runs in seconds on a GPU; the authors re-extract randomly cropped and flipped views
  every epoch, which regularises the probe but costs a forward pass per image and epoch.
"""

import argparse
import math
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import vit


# ------------------------------------------------------------------------------------------------
# 1. Features. A network's: the final-LayerNorm'd [CLS] token for the k-NN, the [CLS] tokens of
#    the last blocks for the linear probe. Raw pixels: the no-learning baseline.
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def extract_features(backbone, batches, device):
    """L2-normalised backbone features for an iterable of (images, labels) batches."""
    feats, labels = [], []
    for x, y in batches:
        f = backbone(x.to(device, non_blocking=True)).float()
        feats.append(F.normalize(f, dim=1).cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def extract_probe_features(backbone, batches, device, n_last_blocks=4, avgpool=False):
    """Features for both evaluations from one forward pass per batch.

    Returns (knn_features, probe_features, labels):
      knn_features   (N, D): the L2-normalised final [CLS] token, exactly what extract_features gives;
      probe_features (N, (n_last_blocks + avgpool) · D): the [CLS] tokens of the last n_last_blocks
                     blocks (each through the final LayerNorm), concatenated, and with avgpool the
                     mean patch token of the last block; not normalised, as the authors feed them.
    The paper uses n = 4 without avgpool for ViT-S and n = 1 with avgpool for ViT-B.
    """
    knn, probe, labels = [], [], []
    for x, y in batches:
        layers = backbone.get_intermediate_layers(x.to(device, non_blocking=True), n_last_blocks)
        tokens = [h[:, 0] for h in layers]  # n_last_blocks × (B, D): the [CLS] tokens
        if avgpool:
            tokens.append(layers[-1][:, 1:].mean(dim=1))  # (B, D): mean over the patch tokens
        knn.append(F.normalize(layers[-1][:, 0].float(), dim=1).cpu())
        probe.append(torch.cat(tokens, dim=1).float().cpu())  # (B, (n + avgpool) · D)
        labels.append(torch.as_tensor(y))
    return torch.cat(knn), torch.cat(probe), torch.cat(labels)


@torch.no_grad()
def raw_pixel_features(train_batches, test_batches, chunk_size=4096):
    """The baseline without any network: an image's pixels are its feature.

    Batches are those of dino.eval_batches (ImageNet-normalised centre views); the normalisation is
    undone so x holds the pixels in [0, 1], flattened to 3·H·W values. With μ the mean training
    image, the feature is f(x) = (x − μ) / ‖x − μ‖, ready for the cosine similarity of the k-NN.
    Pixels are held as 8-bit values between the passes: a quarter of the memory of float32.
    Returns (train_features, train_labels, test_features, test_labels).
    """
    import dino
    mean = torch.tensor(dino.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(dino.IMAGENET_STD).view(1, 3, 1, 1)

    def pixels(batches):
        xs, ys = [], []
        for x, y in batches:
            x = (x.cpu() * std + mean) * 255  # undo (x − mean) / std: back to 0 … 255
            xs.append(rearrange(x.round().clamp(0, 255).to(torch.uint8), "b c h w -> b (c h w)"))
            ys.append(torch.as_tensor(y))
        return torch.cat(xs), torch.cat(ys)

    train_x, train_y = pixels(train_batches)
    test_x, test_y = pixels(test_batches)
    # $$\mu = \frac{1}{N} \sum_{i=1}^{N} x_i$$, per pixel and channel, summed in float64
    mu = sum(c.double().sum(0) for c in train_x.split(chunk_size)) / (255 * len(train_x))
    mu = mu.float()

    def centred(x):
        out = torch.empty(x.shape, dtype=torch.float32)
        for s in range(0, len(x), chunk_size):
            # $$f(x) = \frac{x - \mu}{\lVert x - \mu \rVert}$$
            out[s:s + chunk_size] = F.normalize(x[s:s + chunk_size].float() / 255 - mu, dim=1)
        return out

    return centred(train_x), train_y, centred(test_x), test_y


# ------------------------------------------------------------------------------------------------
# 2. Weighted k-NN (paper Section 4.1): the k most cosine-similar training images vote for their
#    class, each with weight exp(s_i / T). k ∈ {10, 20, 100, 200}, T = 0.07.
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def nearest_neighbours(train_features, test_features, k, chunk_size=1024):
    """Yield (s, idx) per chunk of test images: the similarities (chunk, k) of the k most similar
    training features, in descending order, and their indices. Features must be L2-normalised.

    Memory is bounded by chunk_size × N_train similarities, whatever the number of test images.
    """
    k = min(k, len(train_features))
    for start in range(0, len(test_features), chunk_size):
        q = test_features[start:start + chunk_size].to(train_features.device)
        # s_i = cos(x, x_i) = x · x_i for unit vectors
        s = q @ train_features.T  # (chunk, N_train)
        yield s.topk(k, dim=1)  # values and indices, (chunk, k) each, sorted descending


def weighted_vote(s_top, y_top, T, num_classes):
    """Class scores (n, C) from the similarities s_top (n, k) and labels y_top (n, k) of the neighbours."""
    # $$\mathrm{score}(c) = \sum_{i \in \text{top-}k,\ y_i = c} \exp(s_i / T)$$
    votes = torch.zeros(len(s_top), num_classes, dtype=s_top.dtype, device=s_top.device)
    return votes.scatter_add_(1, y_top, torch.exp(s_top / T))


@torch.no_grad()
def knn_scores(train_features, train_labels, test_features, k=20, T=0.07, num_classes=None,
               chunk_size=1024):
    """Class scores (N_test, C) of the weighted k-NN vote; features must be L2-normalised.

    Works for any number of classes and test images; memory is bounded by chunk_size x N_train.
    """
    num_classes = num_classes or int(train_labels.max()) + 1
    train_labels = train_labels.to(train_features.device)
    scores = [weighted_vote(s, train_labels[idx], T, num_classes)
              for s, idx in nearest_neighbours(train_features, test_features, k, chunk_size)]
    return torch.cat(scores)


def rank_of_true_class(scores, labels):
    """How many classes rank above the true one (0 = top-1), ties going to the lower class index
    as a stable sort would; well defined for any number of classes, fewer than 5 included."""
    labels = labels.to(scores.device)[:, None]  # (n, 1)
    s_true = scores.gather(1, labels)  # (n, 1)
    classes = torch.arange(scores.shape[1], device=scores.device)  # (C,)
    ahead = (scores > s_true) | ((scores == s_true) & (classes < labels))  # (n, C)
    return ahead.sum(dim=1)


def topk_accuracy(scores, labels):
    """(top-1, top-5) accuracy in percent of class scores (n, C) against labels (n,)."""
    rank = rank_of_true_class(scores, labels)
    return (rank < 1).float().mean().item() * 100, (rank < 5).float().mean().item() * 100


@torch.no_grad()
def knn_sweep(train_features, train_labels, test_features, test_labels, ks=(10, 20, 100, 200),
              T=0.07, num_classes=None, chunk_size=1024):
    """{k: (top-1, top-5)} in percent for several k from one pass over the similarities: the k
    nearest neighbours are the first k of the max(ks) nearest."""
    num_classes = num_classes or int(train_labels.max()) + 1
    train_labels = train_labels.to(train_features.device)
    test_labels = torch.as_tensor(test_labels)
    hits = {k: torch.zeros(2, dtype=torch.long) for k in ks}  # correct at top-1, top-5
    start = 0
    for s, idx in nearest_neighbours(train_features, test_features, max(ks), chunk_size):
        y = test_labels[start:start + len(s)]
        start += len(s)
        for k in ks:
            votes = weighted_vote(s[:, :k], train_labels[idx[:, :k]], T, num_classes)
            rank = rank_of_true_class(votes, y).cpu()
            hits[k] += torch.stack([(rank < 1).sum(), (rank < 5).sum()])
    return {k: tuple((100 * h / len(test_labels)).tolist()) for k, h in hits.items()}


def knn_accuracy(train_features, train_labels, test_features, test_labels, k=20, T=0.07,
                 num_classes=None, chunk_size=1024):
    """(top-1, top-5) accuracy in percent of the weighted k-NN classifier."""
    return knn_sweep(train_features, train_labels, test_features, test_labels, (k,), T,
                     num_classes, chunk_size)[k]


# ------------------------------------------------------------------------------------------------
# 3. Linear probe (paper Section 4.1, the authors' eval_linear.py): one Linear layer on frozen
#    features; SGD with momentum 0.9, lr = 0.001 · batch / 256 on a cosine to 0, no weight decay.
# ------------------------------------------------------------------------------------------------

def train_linear_probe(features, labels, num_classes, epochs=100, lr=0.001, batch_size=256,
                       device="cpu", seed=0):
    """A Linear(d, C) trained with cross-entropy on cached features (N, d); returns it on device."""
    g = torch.Generator().manual_seed(seed)
    n, dim = features.shape
    probe = nn.Linear(dim, num_classes)
    with torch.no_grad():  # the authors' init: W ~ N(0, 0.01²), b = 0
        probe.weight.normal_(0.0, 0.01, generator=g)
        probe.bias.zero_()
    probe = probe.to(device)
    # linear scaling rule: $$lr = lr_{base} \cdot \frac{\text{batch}}{256}$$
    peak_lr = lr * batch_size / 256
    optimizer = torch.optim.SGD(probe.parameters(), lr=peak_lr, momentum=0.9, weight_decay=0.0)
    x_all, y_all = features.to(device), labels.to(device)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    for epoch in range(epochs):
        order = torch.randperm(n, generator=g).to(device)
        for step in range(steps_per_epoch):
            t = epoch * steps_per_epoch + step
            # $$lr_t = \tfrac{1}{2}\, lr \,\big(1 + \cos(\pi t / t_{total})\big)$$ per step (authors: per epoch)
            optimizer.param_groups[0]["lr"] = 0.5 * peak_lr * (1 + math.cos(math.pi * t / total))
            idx = order[step * batch_size:(step + 1) * batch_size]
            loss = F.cross_entropy(probe(x_all[idx]), y_all[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return probe


@torch.no_grad()
def probe_accuracy(probe, features, labels, chunk_size=4096):
    """(top-1, top-5) in percent of a trained probe."""
    device = next(probe.parameters()).device
    scores = torch.cat([probe(f.to(device)) for f in features.split(chunk_size)])  # (N, C)
    return topk_accuracy(scores, labels)


# ------------------------------------------------------------------------------------------------
# 4. Loading weights: this project's checkpoints (config + student/teacher) and the authors'
#    released ViT weights (a plain backbone state dict or a full checkpoint with prefixes).
# ------------------------------------------------------------------------------------------------

def backbone_state_dict(state_dict):
    """Strip the authors' prefixes: `module.` (DistributedDataParallel) and `backbone.`
    (MultiCropWrapper); the projection head (`head.*`) is dropped."""
    sd = {k.removeprefix("module."): v for k, v in state_dict.items() if torch.is_tensor(v)}
    if any(k.startswith("backbone.") for k in sd):
        sd = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
    return {k: v for k, v in sd.items() if not k.startswith("head.")}


def require_vit_keys(sd, source):
    """A one-line error unless the state dict has the keys of a ViT (a ResNet's, say, has not)."""
    import dino
    needed = ["cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight"]
    missing = [k for k in needed if k not in sd] or ([] if any(k.startswith("blocks.") for k in sd)
                                                     else ["blocks.*"])
    if missing:
        sample = ", ".join(list(sd)[:3]) or "none"
        raise dino.DinoError(f"{source} holds no ViT weights (no {', '.join(missing)}; its keys "
                             f"begin {sample}); only ViT backbones can be evaluated")


def vit_from_state_dict(sd, source):
    """The ViT these weights fit, sized from their shapes, with the weights loaded strictly.

    Width D from cls_token (1, 1, D), depth from the number of blocks, patch p from
    patch_embed.proj.weight (D, 3, p, p), training resolution from pos_embed (1, (S/p)² + 1, D),
    heads from vit.ARCHS by width. Returns (model, arch name, training resolution S).
    """
    import dino
    require_vit_keys(sd, source)
    dim = sd["cls_token"].shape[-1]
    _, in_chans, patch, _ = sd["patch_embed.proj.weight"].shape  # (D, 3, p, p)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    side = math.isqrt(sd["pos_embed"].shape[1] - 1)  # patches per side at the training resolution
    arch = next((name for name, (d, _, _) in vit.ARCHS.items() if d == dim), None)
    if arch is None:
        widths = ", ".join(f"{name} {d}" for name, (d, _, _) in vit.ARCHS.items())
        raise dino.DinoError(f"{source}: ViT width {dim} is none of the known sizes ({widths})")
    if in_chans != 3:
        raise dino.DinoError(f"{source}: the ViT takes {in_chans} input channels; images are RGB")
    mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / dim if "blocks.0.mlp.fc1.weight" in sd else 4.0
    model = vit.VisionTransformer(img_size=side * patch, patch_size=patch, embed_dim=dim, depth=depth,
                                  num_heads=vit.ARCHS[arch][2], mlp_ratio=mlp_ratio)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise dino.DinoError(f"{source}: the weights do not fit a {arch}/{patch} ViT of depth "
                             f"{depth} ({_first_problem(e)})") from None
    name = arch if depth == vit.ARCHS[arch][1] else f"{arch} (depth {depth})"
    return model, name, side * patch


def load_pretrained(path, weights="teacher"):
    """A ViT backbone from weights in the authors' released format.

    Accepted: a plain backbone state dict (dino_deitsmall16_pretrain.pth), or a full checkpoint
    {"teacher": {...}, "student": {"module.backbone.…": …}}. Returns (backbone, arch, resolution).
    """
    import dino
    obj = dino.load_checkpoint(path)
    if not isinstance(obj, dict):
        raise dino.DinoError(f"{path} holds a {type(obj).__name__}, not a state dict")
    if "teacher" in obj or "student" in obj:
        if not isinstance(obj.get(weights), dict):
            raise dino.DinoError(f"{path} has no {weights!r} weights; try --weights "
                                 f"{'student' if weights == 'teacher' else 'teacher'}")
        obj = obj[weights]
    return vit_from_state_dict(backbone_state_dict(obj), str(path))


def load_dino_checkpoint(path, weights="teacher"):
    """The backbone of a checkpoint of dino.py: (backbone, arch, training resolution).

    The checkpoint holds "student" and "teacher" (state dicts of dino.MultiCropWrapper, keys
    backbone.* and head.*) and "config"; the backbone is built from the config's arch, patch
    size and global crop size, and the weights must fit it exactly.
    """
    import dino
    ck = dino.load_checkpoint(path)
    if not isinstance(ck, dict) or not isinstance(ck.get("teacher"), dict) \
            or not isinstance(ck.get("student"), dict):
        raise dino.DinoError(f"{path} is not a DINO checkpoint (it has no 'teacher' and 'student' "
                             f"weights); for a plain ViT state dict use --pretrained")
    sd = backbone_state_dict(ck[weights])
    config = ck.get("config") if isinstance(ck.get("config"), dict) else {}
    if not {"arch", "patch_size", "global_crops_size"} <= set(config):
        return vit_from_state_dict(sd, str(path))  # no config: size the ViT from the weights
    arch, patch, size = config["arch"], config["patch_size"], config["global_crops_size"]
    if arch not in vit.ARCHS:
        raise dino.DinoError(f"{path} was trained with arch {arch!r}, which vit.py does not know")
    require_vit_keys(sd, str(path))
    backbone = vit.build_vit(arch, patch, img_size=size)
    try:
        backbone.load_state_dict(sd)
    except RuntimeError as e:
        raise dino.DinoError(f"{path}: the {weights} weights do not fit its config's {arch}/{patch} "
                             f"({_first_problem(e)})") from None
    return backbone, arch, size


def _first_problem(error, limit=160):
    """The first specific line of load_state_dict's error (the first line only names the class)."""
    lines = [l.strip() for l in str(error).splitlines() if l.strip()]
    line = lines[1] if len(lines) > 1 else lines[0] if lines else "no message"
    return line if len(line) <= limit else line[:limit] + " ..."


# ------------------------------------------------------------------------------------------------
# 5. Command line.
# ------------------------------------------------------------------------------------------------

def build_parser():
    parser = argparse.ArgumentParser(
        description="Weighted k-NN (and optionally a linear probe) on frozen features, as in the "
                    "DINO paper.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="OUTPUT_DIR/checkpoint.pth written by dino.py")
    source.add_argument("--pretrained", help="ViT weights in the authors' format: a plain backbone "
                                             "state dict, or a full checkpoint with teacher/student")
    source.add_argument("--raw_pixels", action="store_true",
                        help="the pixels themselves, centred by the mean training image, as features")
    source.add_argument("--load_features", help="features saved by --save_features: sweep k and "
                                                "--temperature without a forward pass")
    parser.add_argument("--data", default="shapes",
                        help="any --data of dino.py: 'shapes', a CIFAR-10 folder, or an image folder "
                             "with train/<class>/ and val/ or test/")
    parser.add_argument("--weights", choices=["teacher", "student"], default="teacher",
                        help="whose backbone to evaluate; the paper reports the teacher, which scores higher")
    parser.add_argument("--image_size", type=int, default=0,
                        help="side of the centre view in px (0: the training resolution: the checkpoint's "
                             "global_crops_size, the weights' pos_embed, or for raw pixels 32 px for "
                             "images up to 64 px and 224 px otherwise)")
    parser.add_argument("--k", type=int, nargs="+", default=[10, 20, 100, 200],
                        help="numbers of neighbours (paper: 10 20 100 200; 20 is the headline)")
    parser.add_argument("--temperature", type=float, default=0.07, help="T of the vote weights exp(s/T)")
    parser.add_argument("--batch_size", type=int, default=256, help="images per forward pass")
    parser.add_argument("--chunk_size", type=int, default=1024,
                        help="test images compared at once; memory ≈ chunk_size × N_train × 4 bytes")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--save_features", help="write the extracted features to this file")
    probe = parser.add_argument_group("linear probe")
    probe.add_argument("--linear", action="store_true", help="also train and test a linear probe")
    probe.add_argument("--n_last_blocks", type=int, default=4,
                       help="concatenate the [CLS] tokens of this many last blocks (paper: 4 for "
                            "ViT-S, 1 with --avgpool for ViT-B)")
    probe.add_argument("--avgpool", action="store_true",
                       help="append the last block's mean patch token")
    probe.add_argument("--epochs", type=int, default=100, help="probe training epochs (paper: 100)")
    probe.add_argument("--lr", type=float, default=0.001,
                       help="probe lr at batch 256, scaled linearly with the batch; the best value "
                            "varies with the features, so sweep it (e.g. 0.001 … 0.1) for a fair figure")
    probe.add_argument("--probe_batch_size", type=int, default=256, help="probe training batch")
    probe.add_argument("--seed", type=int, default=0, help="probe init and shuffling")
    return parser


def validate(args):
    import dino
    checks = [(all(k >= 1 for k in args.k), f"--k must be at least 1, got {args.k}"),
              (args.temperature > 0, f"--temperature must be positive, got {args.temperature}"),
              (args.batch_size >= 1, f"--batch_size must be at least 1, got {args.batch_size}"),
              (args.chunk_size >= 1, f"--chunk_size must be at least 1, got {args.chunk_size}"),
              (args.image_size >= 0, f"--image_size must be positive, got {args.image_size}"),
              (args.n_last_blocks >= 1, f"--n_last_blocks must be at least 1, got {args.n_last_blocks}"),
              (args.epochs >= 1, f"--epochs must be at least 1, got {args.epochs}"),
              (args.lr > 0, f"--lr must be positive, got {args.lr}"),
              (args.probe_batch_size >= 1,
               f"--probe_batch_size must be at least 1, got {args.probe_batch_size}")]
    for ok, message in checks:
        if not ok:
            raise dino.DinoError(message)
    if not (args.checkpoint or args.pretrained or args.raw_pixels or args.load_features):
        raise dino.DinoError("nothing to evaluate: give --checkpoint, --pretrained, --raw_pixels "
                             "or --load_features")


def compute_features(args, device, log):
    """Load data and weights, extract features once; returns the dict --save_features writes."""
    import dino
    from tqdm.auto import tqdm
    if args.checkpoint or args.pretrained:  # weights first: their errors come before any data work
        load = load_dino_checkpoint if args.checkpoint else load_pretrained
        backbone, arch, train_size = load(args.checkpoint or args.pretrained, args.weights)
        if args.n_last_blocks > len(backbone.blocks):
            raise dino.DinoError(f"--n_last_blocks {args.n_last_blocks} exceeds the "
                                 f"{len(backbone.blocks)} blocks of the ViT")
        if (args.image_size or train_size) % backbone.patch_size:
            raise dino.DinoError(f"--image_size {args.image_size or train_size} is not a multiple of "
                                 f"the patch size {backbone.patch_size}")
    name, train, evaluation = dino.load_data(args.data)
    if evaluation is None:
        raise dino.DinoError(f"{args.data} has no evaluation split (a val/ or test/ folder beside "
                             f"train/); the k-NN needs one")
    classes = list(train.classes)
    if args.raw_pixels:
        size = args.image_size or dino.preset_for(dino.probe_image_size(train), name).get(
            "global_crops_size", dino.Config.global_crops_size)
        source = f"raw pixels ({size} px centre views)"
        log(f"{source} of {name}: {len(train)} training, {len(evaluation)} evaluation images, "
            f"{len(classes)} classes")
        train_f, train_y, test_f, test_y = raw_pixel_features(
            dino.eval_batches(train, size, args.batch_size),
            dino.eval_batches(evaluation, size, args.batch_size))
        features = dict(train_features=train_f, train_labels=train_y, test_features=test_f,
                        test_labels=test_y)
        if args.linear:  # the probe gets the same centred pixels
            features.update(train_probe=train_f, test_probe=test_f, probe_input="centred pixels")
        return dict(features, classes=classes, source=source, data=name)

    size = args.image_size or train_size
    source = (f"{args.weights} backbone of {args.checkpoint}" if args.checkpoint
              else f"{args.pretrained}") + f" ({arch}/{backbone.patch_size}, {size} px centre views)"
    log(f"{source} on {name}: {len(train)} training, {len(evaluation)} evaluation images, "
        f"{len(classes)} classes")
    backbone = backbone.to(device).eval()
    n = args.n_last_blocks if args.linear else 1
    out = {}
    for split, data in (("train", train), ("test", evaluation)):
        batches = tqdm(dino.eval_batches(data, size, args.batch_size), desc=f"features ({split})",
                       total=math.ceil(len(data) / args.batch_size), leave=False, disable=None)
        knn_f, probe_f, labels = extract_probe_features(backbone, batches, device, n, args.avgpool)
        out.update({f"{split}_features": knn_f, f"{split}_labels": labels})
        if args.linear:
            out[f"{split}_probe"] = probe_f
    if args.linear:
        pooled = " + mean patch token" if args.avgpool else ""
        out["probe_input"] = f"[CLS] of the last {n} block(s){pooled}"
    return dict(out, classes=classes, source=source, data=name)


def read_features(path, need_probe):
    import dino
    features = dino.load_checkpoint(path)
    keys = {"train_features", "train_labels", "test_features", "test_labels", "classes"}
    if not isinstance(features, dict) or not keys <= set(features):
        raise dino.DinoError(f"{path} is not a features file written by --save_features")
    if need_probe and "train_probe" not in features:
        raise dino.DinoError(f"{path} was saved without --linear, so it holds no probe features; "
                             f"extract them again with --linear --save_features")
    return features


def peak_memory_mb():
    """The process's peak resident memory (getrusage's maxrss: kB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10


def main(argv=None, log=print):
    import dino
    args = build_parser().parse_args(argv)
    validate(args)
    device = dino.resolve_device(args.device)
    started = time.time()
    if args.load_features:
        features = read_features(args.load_features, args.linear)
        log(f"features of {features.get('source', '?')} on {features.get('data', '?')}, "
            f"read from {args.load_features}")
    else:
        features = compute_features(args, device, log)
        if args.save_features:
            torch.save(features, args.save_features)
            log(f"features saved to {args.save_features}")
    t_features = time.time() - started

    train_f, test_f = features["train_features"].to(device), features["test_features"]
    train_y, test_y = features["train_labels"], features["test_labels"]
    num_classes = len(features["classes"])
    t0 = time.time()
    results = knn_sweep(train_f, train_y, test_f, test_y, args.k, args.temperature, num_classes,
                        args.chunk_size)
    t_knn = time.time() - t0
    log(f"weighted k-NN on {train_f.shape[1]}-d features, T = {args.temperature}, cosine similarity: "
        f"{len(train_y)} training, {len(test_y)} test images, {num_classes} classes")
    log(f"{'k':>5}  {'top-1':>7}  {'top-5':>7}")
    for k in args.k:
        log(f"{k:>5}  {results[k][0]:>7.2f}  {results[k][1]:>7.2f}")

    t_probe = 0.0
    if args.linear:
        t0 = time.time()
        probe = train_linear_probe(features["train_probe"], train_y, num_classes, args.epochs, args.lr,
                                   args.probe_batch_size, device, args.seed)
        top1, top5 = probe_accuracy(probe, features["test_probe"], test_y)
        t_probe = time.time() - t0
        log(f"linear probe on {features.get('probe_input', 'saved features')} "
            f"({features['train_probe'].shape[1]}-d), {args.epochs} epochs, "
            f"SGD lr {args.lr} at batch 256: top-1 {top1:.2f}  top-5 {top5:.2f}")

    gpu = (f", GPU peak {torch.cuda.max_memory_allocated(device) / 2 ** 20:.0f} MB"
           if device.type == "cuda" else "")
    log(f"time: features {t_features:.1f} s, k-NN {t_knn:.1f} s"
        + (f", linear probe {t_probe:.1f} s" if args.linear else "")
        + f", total {time.time() - started:.1f} s on {device} | peak memory {peak_memory_mb():.0f} MB "
          f"(max RSS){gpu}")
    if args.linear:
        log(f"linear top1={top1:.2f}")
    k = 20 if 20 in args.k else args.k[0]
    log(f"knn top1@{k}={results[k][0]:.2f}")
    return 0


if __name__ == "__main__":
    import dino
    try:
        sys.exit(main())
    except dino.DinoError as e:
        sys.exit(f"error: {e}")
