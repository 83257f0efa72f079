"""The DINO paper's evaluations of frozen features: weighted k-NN and a linear probe.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021, Section 4.1
(k-NN, linear). The weighted k-NN vote is Wu et al., "Unsupervised Feature Learning via
Non-Parametric Instance Discrimination", CVPR 2018. dino.py's end-of-run k-NN monitor calls
extract_features and knn_accuracy from this file, so both report the same number.

  python knn_eval.py --checkpoint runs/shapes/checkpoint.pth           # a checkpoint of dino.py
  python knn_eval.py --checkpoint runs/cifar10/checkpoint.pth --data ./cifar10 --linear
  python knn_eval.py --pretrained dino_deitsmall16_pretrain.pth --data /path/to/images
  python knn_eval.py --raw_pixels --data ./cifar10                     # pixels alone: 45.8 % (k=20)
  python knn_eval.py --embed my_photos --checkpoint runs/my_photos/checkpoint.pth --out emb.pth
  python knn_eval.py --export vit_backbone.pth --checkpoint runs/my_photos/checkpoint.pth

The file reads: 1. features (a network's, or raw pixels)  2. weighted k-NN  3. linear probe
4. segmentation from attention (Jaccard of the 60 % attention masks, on splits with masks)
5. command line, with --embed (the features of any data set) and --export (the backbone in the
authors' layout): they take the same weights and views as the evaluations.

Where this knowingly differs from the authors' eval_knn.py and eval_linear.py:
- any number of classes and any number of test images (theirs assumes 1000 classes and breaks
  below 100 test images), compared in chunks so memory stays bounded, on CPU or GPU;
- the linear probe trains on features extracted once, from centre views without augmentation,
  so it runs in seconds on a GPU; the authors re-extract randomly cropped and flipped views
  every epoch, which regularises the probe but costs a forward pass per image and epoch.
"""

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm  # plain bars: the notebooks train quietly, and tqdm.auto warns there

import augment
import checkpoint
import data
import vit
from data import DinoError, require


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
    return require_finite(torch.cat(feats)), torch.cat(labels)


def require_finite(features, what="the backbone's features"):
    """Features holding NaN or ±inf would rank as neighbours and vote at random (a NaN compares
    false, so a NaN score even counts as a hit): a one-line error instead."""
    bad = (~torch.isfinite(features)).any(dim=1).nonzero()
    require(len(bad) == 0, f"{what} hold NaN or infinite values ({len(bad)} of {len(features)} "
                           f"rows, the first row {bad[0].item() if len(bad) else ''}): the weights "
                           f"overflow on these images; evaluate a checkpoint from before the run "
                           f"diverged, or one trained with --precision fp32")
    return features


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
    return require_finite(torch.cat(knn)), require_finite(torch.cat(probe)), torch.cat(labels)


@torch.no_grad()
def raw_pixel_features(train_batches, test_batches, chunk_size=4096):
    """The baseline without any network: an image's pixels are its feature.

    Batches are those of data.eval_batches (ImageNet-normalised centre views); the normalisation is
    undone so x holds the pixels in [0, 1], flattened to 3·H·W values. With μ the mean training
    image, the feature is f(x) = (x − μ) / ‖x − μ‖, ready for the cosine similarity of the k-NN.
    Pixels are held as 8-bit values between the passes: a quarter of the memory of float32.
    Returns (train_features, train_labels, test_features, test_labels).
    """
    def pixels(batches):
        xs, ys = [], []
        for x, y in batches:
            x = augment.unnormalize(x.cpu()) * 255  # back to 0 … 255
            xs.append(rearrange(x.round().to(torch.uint8), "b c h w -> b (c h w)"))
            ys.append(torch.as_tensor(y))
        return torch.cat(xs), torch.cat(ys)

    train_x, train_y = pixels(train_batches)
    test_x, test_y = pixels(test_batches)
    # $$\mu = \frac{1}{N} \sum_{i=1}^{N} x_i$$, per pixel and channel, summed in float64
    mu = sum(c.double().sum(0) for c in train_x.split(chunk_size)) / (255 * len(train_x))
    mu = mu.float()

    def centred(x):
        out = torch.empty(x.shape, dtype=torch.float32)
        for start in range(0, len(x), chunk_size):
            # $$f(x) = \frac{x - \mu}{\lVert x - \mu \rVert}$$
            out[start:start + chunk_size] = F.normalize(x[start:start + chunk_size].float() / 255 - mu, dim=1)
        return out

    return centred(train_x), train_y, centred(test_x), test_y


# ------------------------------------------------------------------------------------------------
# 2. Weighted k-NN (paper Section 4.1): the k most cosine-similar training images vote for their
#    class, each with weight exp(s_i / T). k ∈ {10, 20, 100, 200}, T = 0.07.
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def nearest_neighbours(train_features, test_features, k, chunk_size=1024, leave_one_out=False):
    """Yield (s, idx) per chunk of test images: the similarities (chunk, k) of the k most similar
    training features, in descending order, and their indices. Features must be L2-normalised.
    leave_one_out: the test images are the training images, and none is its own neighbour (its
    similarity becomes -inf, a vote of weight 0).

    Memory is bounded by chunk_size × N_train similarities, whatever the number of test images.
    """
    k = min(k, len(train_features))
    for start in range(0, len(test_features), chunk_size):
        q = test_features[start:start + chunk_size].to(train_features.device)
        # s_i = cos(x, x_i) = x · x_i for unit vectors
        s = q @ train_features.T  # (chunk, N_train)
        if leave_one_out:
            rows = torch.arange(len(q), device=s.device)
            s[rows, start + rows] = -math.inf
        yield s.topk(k, dim=1)  # values and indices, (chunk, k) each, sorted descending


def weighted_vote(s_top, y_top, temperature, num_classes):
    """Class scores (n, C) from the similarities s_top (n, k) and labels y_top (n, k) of the
    neighbours, relative to the nearest neighbour's weight: each row divided by exp(s_max / T).
    The ranking of the classes is the formula's, and no weight overflows: exp(s / T) exceeds
    float32 at s / T > 88 (T = 0.01 and s > 0.89), and float64 at s / T > 709. Computed in
    float64, so small weights far below the nearest one's are kept too."""
    # $$\mathrm{score}(c) = \sum_{i \in \text{top-}k,\ y_i = c} \exp\big((s_i - s_{\max}) / T\big)$$
    s = s_top.double()
    s_max = s.amax(dim=1, keepdim=True).clamp_min(-1.0)  # -inf (left-out neighbours only): weights 0
    votes = torch.zeros(len(s_top), num_classes, dtype=torch.float64, device=s_top.device)
    return votes.scatter_add_(1, y_top, torch.exp((s - s_max) / temperature))


@torch.no_grad()
def knn_scores(train_features, train_labels, test_features, k=20, temperature=0.07, num_classes=None,
               chunk_size=1024):
    """Class scores (N_test, C) of the weighted k-NN vote, score(c) = Σ exp(s_i / T) over the
    neighbours of class c, in float64; features must be L2-normalised. For a ranking at a small T
    (where these overflow) knn_sweep ranks weighted_vote's relative scores.

    Works for any number of classes and test images; memory is bounded by chunk_size x N_train.
    """
    num_classes = num_classes or int(train_labels.max()) + 1
    train_labels = train_labels.to(train_features.device)
    scores = [weighted_vote(s, train_labels[idx], temperature, num_classes)
              * torch.exp(s.double().amax(dim=1, keepdim=True) / temperature)
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
              temperature=0.07, num_classes=None, chunk_size=1024, leave_one_out=False):
    """{k: (top-1, top-5)} in percent for several k from one pass over the similarities: the k
    nearest neighbours are the first k of the max(ks) nearest. leave_one_out: see
    nearest_neighbours (for a labelled split that votes on its own images)."""
    num_classes = num_classes or int(train_labels.max()) + 1
    train_labels = train_labels.to(train_features.device)
    test_labels = torch.as_tensor(test_labels)
    hits = {k: torch.zeros(2, dtype=torch.long) for k in ks}  # correct at top-1, top-5
    start = 0
    for s, idx in nearest_neighbours(train_features, test_features, max(ks), chunk_size, leave_one_out):
        y = test_labels[start:start + len(s)]
        start += len(s)
        for k in ks:
            votes = weighted_vote(s[:, :k], train_labels[idx[:, :k]], temperature, num_classes)
            rank = rank_of_true_class(votes, y).cpu()
            hits[k] += torch.stack([(rank < 1).sum(), (rank < 5).sum()])
    return {k: tuple((100 * h / len(test_labels)).tolist()) for k, h in hits.items()}


def knn_accuracy(train_features, train_labels, test_features, test_labels, k=20, temperature=0.07,
                 num_classes=None, chunk_size=1024, leave_one_out=False):
    """(top-1, top-5) accuracy in percent of the weighted k-NN classifier."""
    return knn_sweep(train_features, train_labels, test_features, test_labels, (k,), temperature,
                     num_classes, chunk_size, leave_one_out)[k]


# ------------------------------------------------------------------------------------------------
# 3. Linear probe (paper Section 4.1, the authors' eval_linear.py): one Linear layer on frozen
#    features; SGD with momentum 0.9, lr = 0.001 · batch / 256 on a cosine to 0, no weight decay.
# ------------------------------------------------------------------------------------------------

def train_linear_probe(features, labels, num_classes, epochs=100, lr=0.001, batch_size=256,
                       device="cpu", seed=0):
    """A Linear(d, C) trained with cross-entropy on cached features (N, d); returns it on device."""
    generator = torch.Generator().manual_seed(seed)
    n, dim = features.shape
    probe = nn.Linear(dim, num_classes)
    with torch.no_grad():  # the authors' init: W ~ N(0, 0.01²), b = 0
        probe.weight.normal_(0.0, 0.01, generator=generator)
        probe.bias.zero_()
    probe = probe.to(device)
    # linear scaling rule: $$lr = lr_{base} \cdot \frac{\text{batch}}{256}$$
    peak_lr = lr * batch_size / 256
    optimizer = torch.optim.SGD(probe.parameters(), lr=peak_lr, momentum=0.9, weight_decay=0.0)
    x_all, y_all = features.to(device), labels.to(device)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator).to(device)
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
# 4. Segmentation from attention (paper Section 4.2.1, Figures 1 and 4): the last block's [CLS]
#    attention of each head, cut to the patches holding 60 % of its mass, against the ground truth.
# ------------------------------------------------------------------------------------------------

def attention_mask(attention: torch.Tensor, share: float = 0.6) -> torch.Tensor:
    """The positions holding `share` of the attention mass, per row (the authors' rule): sort
    ascending, normalise to sum 1, cumulative sum, keep where it exceeds 1 − share. What is
    dropped are the smallest values whose mass is at most 1 − share, so the kept mass is ≥ share,
    and keeping the largest values first makes the set the smallest that holds it.

    Ties: equal values are kept or dropped together (each takes the cumulative sum at the last of
    its group), so the mask does not depend on the order a sort puts them in; a tie that straddles
    the boundary is kept whole. A uniform row keeps every position. attention: (..., n) ≥ 0;
    returns a bool tensor of the same shape.
    """
    values, order = attention.sort(dim=-1)
    values = values / values.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    # $$C_i = \sum_{j \le i} a_{(j)}$$ over the ascending values, read at the end of each tie group
    last_of_tie = torch.searchsorted(values.contiguous(), values.contiguous(), right=True) - 1
    cumsum = values.cumsum(dim=-1).gather(-1, last_of_tie)
    keep_sorted = cumsum > 1 - share
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)  # back to input order


def upsample(maps: torch.Tensor, patch: int) -> torch.Tensor:
    """(..., gh, gw) → (..., gh·p, gw·p), each patch value repeated over its p x p pixels."""
    return maps.repeat_interleave(patch, dim=-2).repeat_interleave(patch, dim=-1)


def jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Jaccard similarity (IoU) of bool masks over their last two dimensions (broadcast):
    |a ∩ b| / |a ∪ b|, and 1 where both are empty (two empty masks agree)."""
    # $$J(A, B) = \frac{|A \cap B|}{|A \cup B|}$$
    inter = (a & b).sum((-2, -1)).float()
    union = (a | b).sum((-2, -1)).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Area under the ROC curve of scores (..., n) for the positions `positive` (n,) bool: the
    chance that a positive outscores a negative, a tie counting one half (Mann-Whitney); 0.5 is
    chance whatever the share of positives; NaN where there are no positives or no negatives."""
    n_pos, n = int(positive.sum()), positive.numel()
    if n_pos in (0, n):
        return torch.full(scores.shape[:-1], math.nan)
    ordered = scores.sort(dim=-1).values.contiguous()
    s = scores.contiguous()
    # average 1-based rank of each score, ties sharing the mean of their ranks
    ranks = (torch.searchsorted(ordered, s, right=False) + torch.searchsorted(ordered, s, right=True) + 1) / 2
    # $$\mathrm{AUROC} = \frac{\sum_{i \in P} r_i - |P|(|P| + 1)/2}{|P|\,|N|}$$
    return (ranks[..., positive].double().sum(-1) - n_pos * (n_pos + 1) / 2) / (n_pos * (n - n_pos))


@torch.no_grad()
def attention_segmentation(backbone, batches, share: float = 0.6, device="cpu") -> dict:
    """The last block's [CLS] → patch attention of each head against the ground truth.

    batches: (images, labels) as data.mask_batches gives them: images normalised (B, 3, H, W),
    H and W multiples of the patch size; labels (B, H, W) integer label maps, 0 background,
    1 … 254 one object each, data.VOID not scored (bool masks are one object). Returns
      jaccard (M, heads): per object, the Jaccard of each head's attention mask (attention_mask
          at `share`, upsampled to pixels) with the object's pixels, VOID pixels left out of both;
      image (M,): the image of each object row;
      auroc (N, heads): per image, the AUROC of the attention as a score for "this patch is
          object" (at least half its pixels belong to an object);
      mass_ratio (N, heads): per image, the attention mass on object pixels over the objects'
          share of the frame (each patch's mass spread over its pixels): 1.0 for uniform attention.
    Images without objects get no Jaccard row and NaN AUROC and mass ratio.
    """
    p, out = backbone.patch_size, {"jaccard": [], "image": [], "auroc": [], "mass_ratio": []}
    seen = 0
    for x, labels in batches:
        attn = backbone.get_last_selfattention(x.to(device))  # (B, heads, 1 + gh·gw, 1 + gh·gw)
        a = attn[:, :, 0, 1:].float().cpu()  # (B, heads, gh·gw): drop [CLS] → [CLS]
        a = a / a.sum(-1, keepdim=True).clamp_min(1e-30)
        gh = x.shape[-2] // p
        keep = upsample(rearrange(attention_mask(a, share), "b h (gh gw) -> b h gh gw", gh=gh), p)
        labels = labels.cpu().long()
        for i in range(len(x)):
            scored = labels[i] != data.VOID  # (H, W)
            objects = [k for k in labels[i].unique().tolist() if k not in (0, data.VOID)]
            for k in objects:
                truth = labels[i] == k
                out["jaccard"].append(jaccard(keep[i] & scored, truth[None]))  # (heads,)
                out["image"].append(seen + i)
            on_object = ((labels[i] > 0) & scored).float()  # (H, W)
            # each patch's share of object pixels, (gh·gw,)
            share_p = rearrange(F.avg_pool2d(on_object[None, None], p), "1 1 gh gw -> (gh gw)")
            out["auroc"].append(auroc(a[i], share_p >= 0.5))
            frame = share_p.mean()
            # $$\rho = \frac{\sum_j a_j s_j}{\frac{1}{n}\sum_j s_j}$$, s_j the object share of patch j
            out["mass_ratio"].append((a[i] * share_p).sum(-1) / frame if frame > 0
                                     else torch.full((a.shape[1],), math.nan))
        seen += len(x)
    return {"jaccard": torch.stack(out["jaccard"]) if out["jaccard"] else torch.zeros(0, 0),
            "image": torch.tensor(out["image"], dtype=torch.long),
            "auroc": torch.stack(out["auroc"]), "mass_ratio": torch.stack(out["mass_ratio"])}


def per_image_mean(rows: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """The mean of the rows (M, ...) of each image, over the images that have rows: (N', ...)."""
    images = image.unique()
    return torch.stack([rows[image == i].mean(0) for i in images])


def segmentation_report(measures: dict, share: float = 0.6) -> list[str]:
    """The log lines of attention_segmentation's measures: a sentence, then machine lines.

    jaccard@60: the paper's protocol (Caron et al., Figure 4; the first author's description in
    facebookresearch/dino issue #54): for each object the head whose mask fits it best, the mean
    over the objects of an image, then over the images. jaccard@60_fixed_head: one head for the
    whole split (the best mean); jaccard@60_mean_heads: the mean over heads. attention_auroc: the
    best head of each image, averaged (_fixed_head, _mean_heads likewise). attention_mass_ratio:
    the best head of each image, averaged (1.0: the head looks at the object no more than at the
    rest of the frame)."""
    pct = round(100 * share)
    J, image = measures["jaccard"], measures["image"]
    if len(J) == 0:
        return ["no image of the evaluation split holds an object in its mask: no segmentation measure"]
    paper = per_image_mean(J.max(dim=1).values, image).mean()
    per_head = per_image_mean(J, image).mean(0)  # (heads,)
    best = int(per_head.argmax())
    A, R = measures["auroc"], measures["mass_ratio"]
    scored = ~A.isnan().any(1)
    A_best, A_head = A[scored].max(1).values.mean(), A[scored].mean(0)
    R_best, R_head = R[~R.isnan().any(1)].max(1).values.mean(), R[~R.isnan().any(1)].mean(0)
    fmt = lambda t: " ".join(f"{v:.3f}" for v in t.tolist())  # noqa: E731
    return [
        f"attention against the ground truth, {int(image.unique().numel())} images with {len(J)} "
        f"object(s): Jaccard of the {pct} % masks, best head per object (the paper's protocol) "
        f"{paper:.3f}; per head {fmt(per_head)} (fixed best head {best + 1}: {per_head[best]:.3f}, "
        f"mean {per_head.mean():.3f}); AUROC of the attention for 'patch is object' (0.5: chance), "
        f"best head per image {A_best:.3f}, per head {fmt(A_head)}; mass on the object / its share "
        f"of the frame (1.0: uniform), best head per image {R_best:.3f}, per head {fmt(R_head)}",
        f"jaccard@{pct}={paper:.3f}",
        f"jaccard@{pct}_fixed_head={per_head[best]:.3f}",
        f"jaccard@{pct}_mean_heads={per_head.mean():.3f}",
        f"attention_auroc={A_best:.3f}",
        f"attention_auroc_fixed_head={A_head.max():.3f}",
        f"attention_mass_ratio={R_best:.3f}",
    ]


# ------------------------------------------------------------------------------------------------
# 5. Command line.
# ------------------------------------------------------------------------------------------------

def build_parser():
    parser = argparse.ArgumentParser(
        description="Weighted k-NN (and optionally a linear probe) on frozen features, as in the "
                    "DINO paper.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="OUTPUT_DIR/checkpoint.pth written by dino.py")
    source.add_argument("--pretrained", "--pretrained_weights", help="ViT weights in the authors' format: a plain backbone "
                                             "state dict, or a full checkpoint with teacher/student")
    source.add_argument("--raw_pixels", action="store_true",
                        help="the pixels themselves, centred by the mean training image, as features")
    source.add_argument("--load_features", help="features saved by --save_features: sweep k and "
                                                "--temperature without a forward pass")
    parser.add_argument("--data", "--data_path", default="shapes",
                        help="any --data of dino.py: 'shapes', a CIFAR-10 folder, or an image folder "
                             "with train/<class>/ and val/ or test/")
    parser.add_argument("--weights", "--checkpoint_key", choices=["teacher", "student"], default="teacher",
                        help="whose backbone to evaluate; the paper reports the teacher, which scores higher")
    parser.add_argument("--random_init", action="store_true",
                        help="evaluate an untrained ViT of the size of --checkpoint's or --pretrained's "
                             "(initialised with --seed): the random-init baseline")
    parser.add_argument("--share", type=float, default=0.6,
                        help="on evaluation splits with masks: the attention masks keep this share of "
                             "the [CLS] attention mass (paper: 0.6) for the Jaccard")
    parser.add_argument("--image_size", type=int, default=0,
                        help="side of the centre view in px (0: the training resolution: the checkpoint's "
                             "global_crops_size, the weights' pos_embed, or for raw pixels 32 px for "
                             "images up to 64 px and 224 px otherwise)")
    parser.add_argument("--k", "--nb_knn", type=int, nargs="+", default=[10, 20, 100, 200],
                        help="numbers of neighbours (paper: 10 20 100 200; 20 is the headline)")
    parser.add_argument("--temperature", type=float, default=0.07, help="T of the vote weights exp(s/T)")
    parser.add_argument("--batch_size", "--batch_size_per_gpu", type=int, default=256, help="images per forward pass")
    parser.add_argument("--chunk_size", type=int, default=1024,
                        help="test images compared at once; memory ≈ chunk_size × N_train × 4 bytes")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--save_features", "--dump_features",
                        help="write the extracted features to this file")
    add_command_flags(parser)
    return parser


def add_command_flags(parser):
    """The flags of --embed and --export, and of the linear probe."""
    out = parser.add_argument_group("taking the weights out (instead of evaluating)")
    out.add_argument("--embed", metavar="DATA",
                     help="write the features of every image of DATA (any --data: a folder of images "
                          "at any depth, labelled or not, shapes, CIFAR-10) to --out: an (N, D) tensor "
                          "and each row's image path (or index, for data held in memory)")
    out.add_argument("--split", choices=["train", "eval"], default="train",
                     help="with --embed: the training images (of a folder without labels: all of "
                          "them) or the evaluation split")
    out.add_argument("--out", help="with --embed: the file to write (None: embeddings_<data name>.pth)")
    out.add_argument("--export", metavar="FILE",
                     help="write the --weights backbone to FILE as a plain state dict in the authors' "
                          "dino_*_pretrain.pth layout (vit.py, hubconf.py and timm load it)")
    probe = parser.add_argument_group("linear probe")
    probe.add_argument("--linear", action="store_true", help="also train and test a linear probe")
    probe.add_argument("--n_last_blocks", type=int, default=None,
                       help="concatenate the [CLS] tokens of this many last blocks (None: 4 with --linear, "
                            "1 with --embed; paper: 4 for ViT-S, 1 with --avgpool for ViT-B)")
    probe.add_argument("--avgpool", action="store_true",
                       help="append the last block's mean patch token (with --embed too: then the "
                            "features are the probe's input, not L2-normalised)")
    probe.add_argument("--epochs", type=int, default=100, help="probe training epochs (paper: 100)")
    probe.add_argument("--lr", type=float, default=0.001,
                       help="probe lr at batch 256, scaled linearly with the batch; the best value "
                            "varies with the features, so sweep it (e.g. 0.001 … 0.1) for a fair figure")
    probe.add_argument("--probe_batch_size", type=int, default=256, help="probe training batch")
    probe.add_argument("--seed", type=int, default=0, help="probe init and shuffling (and the "
                                                            "ViT's init with --random_init)")


FLAG_RULES = dict(share="(0,1)", k=">=1", temperature=">0", batch_size=">=1", chunk_size=">=1", image_size="side>=0",
                  n_last_blocks=">=1", epochs=">=1", lr=">0", probe_batch_size=">=1", seed="seed")
RAW_PIXELS_MAX_SIDE = 256  # raw-pixel features are 3 x side^2 floats an image: 786 kB at 256 px


def validate(args):
    """One-line errors for bad flags, before any work (data.RULES, as dino.py's Config uses)."""
    for name, rule in FLAG_RULES.items():
        if getattr(args, name) is not None:  # None: a default that depends on the command
            data.check_flag(name, getattr(args, name), rule)
    data.resolve_device(args.device)
    require(not args.raw_pixels or args.image_size <= RAW_PIXELS_MAX_SIDE,
            f"--image_size {args.image_size} makes raw-pixel features of 3x{args.image_size}x"
            f"{args.image_size} floats an image; with --raw_pixels it may be at most "
            f"{RAW_PIXELS_MAX_SIDE} px")
    require(not (args.embed and args.export), "--embed and --export are two commands; give one")
    command = "--embed" if args.embed else "--export" if args.export else None
    if command:
        require(args.checkpoint or args.pretrained,
                f"{command} takes a network's weights: give --checkpoint or --pretrained")
        require(not args.linear and not args.save_features,
                f"--linear and --save_features belong to the k-NN evaluation, not to {command}")
    require(args.checkpoint or args.pretrained or args.raw_pixels or args.load_features,
            "nothing to evaluate: give --checkpoint, --pretrained, --raw_pixels or --load_features")
    require(not args.random_init or args.checkpoint or args.pretrained,
            "--random_init takes the network's size from --checkpoint or --pretrained; give one")
    for flag, path in (("--save_features", args.save_features), ("--out", args.out), ("--export", args.export)):
        if path:  # the features take minutes to extract: fail before, not after
            data.writable_file(path, flag)


def load_weights(args) -> vit.VisionTransformer:
    """The --weights backbone of --checkpoint or --pretrained, checked against the flags."""
    path = args.checkpoint or args.pretrained
    weights = checkpoint.load_checkpoint(path)
    require(not args.checkpoint or (isinstance(weights, dict) and "teacher" in weights),
            f"{path} is not a DINO checkpoint (it has no 'teacher' and 'student' weights); for "
            f"a plain ViT state dict use --pretrained")
    backbone = checkpoint.backbone_from(weights, str(path), args.weights)
    if args.random_init:
        backbone = vit.untrained_like(backbone, args.seed)
    require(args.n_last_blocks <= len(backbone.blocks), f"--n_last_blocks {args.n_last_blocks} "
            f"exceeds the {len(backbone.blocks)} blocks of the ViT")
    size = args.image_size or backbone.img_size
    require(size % backbone.patch_size == 0,
            f"--image_size {size} is not a multiple of the patch size {backbone.patch_size}")
    data.check_patches(size, size, backbone.patch_size, f"--image_size {size}: a view of", "lower it")
    return backbone


def describe_source(args, backbone, size) -> str:
    untrained = f"untrained ViT (seed {args.seed}) the size of the " if args.random_init else ""
    return untrained + (f"{args.weights} backbone of {args.checkpoint}" if args.checkpoint
                        else f"{args.pretrained}") + f" ({vit.describe(backbone)}, {size} px centre views)"


def compute_features(args, device, log):
    """Load data and weights, extract features once; returns the dict --save_features writes."""
    if args.checkpoint or args.pretrained:  # weights first: their errors come before any data work
        backbone = load_weights(args)
        train_size = backbone.img_size
    name, train_set, eval_set = data.load_data(args.data)
    if not data.has_labels(train_set) and not args.raw_pixels and not args.linear:
        masked = data.masked_images(args.data)
        if masked is not None:  # the segmentation measures alone
            return segmentation_only(args, backbone, masked, name, device, log)
    require(data.has_labels(train_set), f"{args.data} has no labels (no train/<class>/ folders), "
            f"so the k-NN has nothing to vote with; `python knn_eval.py --embed {args.data} "
            f"--checkpoint ...` writes the features of its images (and with masks under "
            f"{args.data}/{data.MASKS_FOLDER}/ this command measures the attention against them)")
    require(eval_set is not None, f"{args.data} has no evaluation split (a val/ or test/ folder "
                                  f"beside train/); the k-NN needs one")
    classes = list(train_set.classes)
    if args.raw_pixels:
        # the images' own size up to 64 px (dino.py trains small images at 32 px), else 224 px
        side = data.probe_image_size(train_set)
        size = args.image_size or (side if side <= 64 else 224)
        source = f"raw pixels ({size} px centre views)"
        log(f"{source} of {name}: {len(train_set)} training, {len(eval_set)} evaluation images, "
            f"{len(classes)} classes")
        train_f, train_y, test_f, test_y = raw_pixel_features(
            data.eval_batches(train_set, size, args.batch_size),
            data.eval_batches(eval_set, size, args.batch_size))
        features = dict(train_features=train_f, train_labels=train_y, test_features=test_f,
                        test_labels=test_y)
        if args.linear:  # the probe gets the same centred pixels
            features.update(train_probe=train_f, test_probe=test_f, probe_input="centred pixels")
        return dict(features, classes=classes, source=source, data=name)

    size = args.image_size or train_size
    source = describe_source(args, backbone, size)
    log(f"{source} on {name}: {len(train_set)} training, {len(eval_set)} evaluation images, "
        f"{len(classes)} classes")
    backbone = backbone.to(device).eval()
    n = args.n_last_blocks if args.linear else 1
    out = {}
    for split, images in (("train", train_set), ("test", eval_set)):
        batches = tqdm(data.eval_batches(images, size, args.batch_size), desc=f"features ({split})",
                       total=math.ceil(len(images) / args.batch_size), leave=False, disable=None)
        knn_f, probe_f, labels = extract_probe_features(backbone, batches, device, n, args.avgpool)
        out.update({f"{split}_features": knn_f, f"{split}_labels": labels})
        if args.linear:
            out[f"{split}_probe"] = probe_f
    if args.linear:
        pooled = " + mean patch token" if args.avgpool else ""
        out["probe_input"] = f"[CLS] of the last {n} block(s){pooled}"
    if eval_set.masks is not None or eval_set.mask_files is not None:  # the paper's Jaccard
        out["segmentation"] = attention_segmentation(
            backbone, data.mask_batches(eval_set, size, args.batch_size), args.share, device)
    return dict(out, classes=classes, source=source, data=name)


def segmentation_only(args, backbone, masked, name, device, log) -> dict:
    """A folder of images with masks and no labels: attention_segmentation on every image."""
    size = args.image_size or backbone.img_size
    source = describe_source(args, backbone, size)
    log(f"{source} on {name}: no labels, so no k-NN; the attention of {len(masked)} images against "
        f"their masks")
    batches = data.mask_batches(masked, size, args.batch_size)
    return dict(segmentation=attention_segmentation(backbone.to(device).eval(), batches, args.share, device),
                source=source, data=name)


def embed(args, device, log):
    """--embed: the features of every readable image of one split, row i for the image at
    paths[i] (images from files) or indices[i] (data sets generated or unpacked into memory), in
    the split's order (a folder's: sorted paths). By default the k-NN's feature, the
    L2-normalised [CLS] token; with --avgpool or --n_last_blocks > 1 the linear probe's input."""
    backbone = load_weights(args)
    size = args.image_size or backbone.img_size
    name, train_set, eval_set = data.load_data(args.embed)
    images = train_set if args.split == "train" else eval_set
    require(images is not None, f"{args.embed} has no evaluation split (a labelled val/ or test/ "
                                f"folder); --split train embeds its images")
    source = describe_source(args, backbone, size)
    log(f"{source} on {name}, {args.split} split: {len(images)} images")
    started = time.time()
    # each image's position rides through eval_batches as its label: the batches leave out
    # unreadable files, and every row that comes out still names its image
    numbered = dataclasses.replace(images, labels=torch.arange(len(images)))
    batches = tqdm(data.eval_batches(numbered, size, args.batch_size), desc="embedding",
                   total=math.ceil(len(images) / args.batch_size), leave=False, disable=None)
    knn_f, probe_f, index = extract_probe_features(backbone.to(device).eval(), batches, device,
                                                   args.n_last_blocks, args.avgpool)
    probe = args.avgpool or args.n_last_blocks > 1
    kind = (f"[CLS] of the last {args.n_last_blocks} block(s)" + (" + mean patch token" if args.avgpool else "")
            if probe else "L2-normalised [CLS] token")
    out = dict(features=probe_f if probe else knn_f, feature=kind, source=source, data=name,
               split=args.split, image_size=size)
    if images.files is not None:
        out["paths"] = [images.files[i] for i in index.tolist()]
    else:
        out["indices"] = index
    dropped = sorted(set(range(len(images))) - set(index.tolist()))
    out["unreadable"] = list(images.unreadable) + [images.files[i] for i in dropped]
    if data.has_labels(images):
        out.update(labels=images.labels[index], classes=list(images.classes))
    path = Path(args.out or f"embeddings_{name}.pth")  # validate() made and probed its folder
    checkpoint.save_checkpoint(out, path)
    seconds = time.time() - started
    if out["unreadable"]:
        log(f"warning: skipped {len(out['unreadable'])} unreadable image(s): "
            f"{', '.join(out['unreadable'][:5])}" + (" ..." if len(out["unreadable"]) > 5 else ""))
    log(f"wrote {tuple(out['features'].shape)} features ({kind}) and each row's "
        f"{'path' if 'paths' in out else 'index'} to {path} in {seconds:.1f} s "
        f"({len(index) / max(seconds, 1e-9):.0f} images/s on {device}) | {data.peak_memory(device)}")
    return 0


def export(args, log):
    """--export: the backbone as the authors' dino_*_pretrain.pth files hold it, a plain state
    dict of the ViT (cls_token, pos_embed, patch_embed.proj.*, blocks.{i}.*, norm.*), which
    checkpoint.load_backbone, hubconf.from_file and timm's VisionTransformer load strictly."""
    backbone = load_weights(args)
    state = dict(backbone.state_dict())  # plain: the name → tensor table and nothing else
    path = Path(args.export)  # validate() made and probed its folder
    checkpoint.save_checkpoint(state, path, with_checksum=False)  # the plain layout other code loads strictly
    millions = sum(v.numel() for v in state.values()) / 1e6
    which = f"the {args.weights} backbone of {args.checkpoint}" if args.checkpoint else args.pretrained
    log(f"wrote {which} ({vit.describe(backbone)} trained at {backbone.img_size} px, "
        f"{millions:.2f}M parameters) to {path}, a plain state dict in the authors' "
        f"dino_*_pretrain.pth layout")
    return 0


def read_features(path, need_probe):
    features = checkpoint.load_checkpoint(path)
    keys = {"train_features", "train_labels", "test_features", "test_labels", "classes"}
    require(isinstance(features, dict) and keys <= set(features),
            f"{path} is not a features file written by --save_features")
    require(not need_probe or "train_probe" in features,
            f"{path} was saved without --linear, so it holds no probe features; extract them "
            f"again with --linear --save_features")
    check_features(features, path)
    for key in ("train_features", "test_features", "train_probe", "test_probe"):
        if key in features:
            require_finite(features[key], f"the {key} of {path}")
    return features


def check_features(features: dict, path):
    """One-line errors for a features file whose parts do not fit together, before the k-NN: each
    split's (N, D) features and N labels, one D for both splits, labels among the classes."""
    classes = features["classes"]
    require(isinstance(classes, list) and len(classes) >= 1, f"{path}: 'classes' is not a list of "
                                                             f"class names; extract the features again")
    dims = {}
    for kind in ("features", "probe"):
        for split in ("train", "test"):
            x, y = features.get(f"{split}_{kind}"), features[f"{split}_labels"]
            if kind == "probe" and x is None:
                continue
            require(isinstance(x, torch.Tensor) and x.ndim == 2 and x.is_floating_point() and len(x) >= 1,
                    f"{path}: {split}_{kind} is not an (N, D) tensor of floats; extract the features again")
            require(isinstance(y, torch.Tensor) and y.ndim == 1 and not y.is_floating_point()
                    and y.dtype != torch.bool and len(y) == len(x),
                    f"{path}: {split}_labels is not one whole-number label for each of the {len(x)} "
                    f"rows of {split}_{kind}; extract the features again")
            bad = y[(y < 0) | (y >= len(classes))][:1].tolist()
            require(not bad, f"{path}: {split}_labels holds the label {bad[0] if bad else None}, beyond "
                             f"the {len(classes)} classes it names (labels run from 0 to "
                             f"{len(classes) - 1}); extract the features again")
            dims.setdefault(kind, {})[split] = x.shape[1]
        if kind in dims:
            require(len(set(dims[kind].values())) == 1,
                    f"{path}: the training {kind} are {dims[kind]['train']}-d, the test {kind} "
                    f"{dims[kind]['test']}-d; both splits must come from one network")


def report_knn(args, features: dict, device, log) -> tuple[dict, list]:
    """The weighted k-NN of the features for every --k (cut to the training images), as a table;
    returns ({k: (top-1, top-5)}, the k's run)."""
    train_f, test_f = features["train_features"].to(device), features["test_features"]
    train_y, test_y = features["train_labels"], features["test_labels"]
    num_classes = len(features["classes"])
    ks = list(dict.fromkeys(min(k, len(train_y)) for k in args.k))  # a vote has at most every training image
    if max(args.k) > len(train_y):
        log(f"k = {len(train_y)} (the training split has {len(train_y)} images, fewer than --k "
            f"{max(args.k)})")
    if len(torch.as_tensor(train_y).unique()) < 2:
        log(one_class_warning(features["classes"]))
    results = knn_sweep(train_f, train_y, test_f, test_y, ks, args.temperature, num_classes,
                        args.chunk_size)
    log(f"weighted k-NN on {train_f.shape[1]}-d features, T = {args.temperature}, cosine similarity: "
        f"{len(train_y)} training, {len(test_y)} test images, {num_classes} classes")
    log(f"{'k':>5}  {'top-1':>7}  {'top-5':>7}")
    for k in ks:
        log(f"{k:>5}  {results[k][0]:>7.2f}  {results[k][1]:>7.2f}")
    return results, ks


def one_class_warning(classes) -> str:
    """For labels of one class: every vote names it, so a top-1 of 100 % says nothing."""
    named = f" ({classes[0]})" if len(classes) == 1 else ""
    return (f"warning: the training labels hold one class{named}, so every neighbour votes for it "
            f"and the k-NN top-1 measures nothing about the features (100 % when the test images "
            f"are of that class too); give labelled images of at least two classes")


def report_probe(args, features: dict, device, log) -> float:
    """Train the linear probe on the training features, test it; returns its top-1."""
    train_y, test_y = features["train_labels"], features["test_labels"]
    probe = train_linear_probe(features["train_probe"], train_y, len(features["classes"]), args.epochs,
                               args.lr, args.probe_batch_size, device, args.seed)
    top1, top5 = probe_accuracy(probe, features["test_probe"], test_y)
    log(f"linear probe on {features.get('probe_input', 'saved features')} "
        f"({features['train_probe'].shape[1]}-d), {args.epochs} epochs, "
        f"SGD lr {args.lr} at batch 256: top-1 {top1:.2f}  top-5 {top5:.2f}")
    return top1


def main(argv=None, log=print):
    args = build_parser().parse_args(argv)
    if args.n_last_blocks is None:
        args.n_last_blocks = 4 if args.linear else 1
    validate(args)
    device = data.resolve_device(args.device)
    if args.export:
        return export(args, log)
    if args.embed:
        return embed(args, device, log)
    started = time.time()
    if args.load_features:
        features = read_features(args.load_features, args.linear)
        log(f"features of {features.get('source', '?')} on {features.get('data', '?')}, "
            f"read from {args.load_features}")
    else:
        features = compute_features(args, device, log)
        if args.save_features:
            checkpoint.save_checkpoint(features, Path(args.save_features))
            log(f"features saved to {args.save_features}")
    t_features = time.time() - started

    seg_lines = segmentation_report(features["segmentation"], args.share) if "segmentation" in features else []
    if "train_features" not in features:  # images with masks and no labels: no k-NN to run
        for line in seg_lines:
            log(line)
        return 0
    t0 = time.time()
    results, _ = report_knn(args, features, device, log)
    t_knn = time.time() - t0
    for line in seg_lines[:1]:
        log(line)
    t0 = time.time()
    top1 = report_probe(args, features, device, log) if args.linear else None
    t_probe = time.time() - t0

    log(f"time: features {t_features:.1f} s, k-NN {t_knn:.1f} s"
        + (f", linear probe {t_probe:.1f} s" if args.linear else "")
        + f", total {time.time() - started:.1f} s on {device} | {data.peak_memory(device)}")
    if args.linear:
        log(f"linear top1={top1:.2f}")
    k = min(20 if 20 in args.k else args.k[0], len(features["train_labels"]))  # the headline k, as run
    log(f"knn top1@{k}={results[k][0]:.2f}")
    for line in seg_lines[1:]:
        log(line)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DinoError as e:
        sys.exit(f"error: {e}")
