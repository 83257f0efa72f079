"""The image operations of DINO's augmentations, on whole batches of tensors.

dino.multicrop composes them into the paper's views (Section 3.1 and the authors'
DataAugmentationDINO): random resized crops (PIL-exact bicubic), flips, colour jitter,
grayscale, Gaussian blur and solarization, with per-image random parameters, and the ImageNet
normalisation the authors apply to every data set. Each equals its torchvision counterpart
(tests/test_augment.py), so whole batches are augmented at once, on the CPU or the GPU.
"""

import functools
import math

import torch
import torch.nn.functional as F
from einops import rearrange

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the authors normalise every data set with these
IMAGENET_STD = (0.229, 0.224, 0.225)


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

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # luma weights of torchvision's rgb_to_grayscale


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


def where_images(mask, op, x, *args, every_image=None):
    """x with op(x, *args) on the images where mask (n,) holds; args are per-image (n, ...).

    every_image (default: on a GPU) computes op for every image and then selects, so no step waits
    for the host; otherwise op runs only on the selected images, which is cheaper on a CPU. Both
    give equal results.
    """
    if every_image if every_image is not None else x.is_cuda:
        return torch.where(mask.view(-1, 1, 1, 1), op(x, *args), x)
    if not mask.any():
        return x
    x = x.clone()
    x[mask] = op(x[mask], *(a[mask] for a in args))
    return x


def photometric(x, p: dict, max_sigma: float):
    """Colour jitter (random order), grayscale, blur, solarize with parameters p (drawn by
    dino.sample_view_params); x in [0, 1]; max_sigma bounds the blur kernel's radius."""
    for step in range(4):  # ColorJitter: the four operations in a per-image random order
        for k, op in enumerate(JITTER_OPS):
            x = where_images(p["jitter"] & (p["order"][:, step] == k), op, x, p["factors"][:, k])
    x = where_images(p["gray"], lambda v: grayscale(v).expand(-1, 3, -1, -1), x)
    x = where_images(p["blur"], lambda v, s: gaussian_blur(v, s, max_sigma), x, p["sigma"])
    return where_images(p["solarize"], solarize, x)


def normalize(x):
    """Pixels in [0, 1] → the network's input, with the ImageNet mean and std, as the authors do."""
    mean, std = _mean_std(x.device)
    return (x - mean) / std


def unnormalize(x):
    """The inverse of normalize: a network's input back to pixels in [0, 1]."""
    mean, std = _mean_std(x.device)
    return (x * std + mean).clamp(0, 1)


@functools.lru_cache(maxsize=None)
def _mean_std(device):  # made once per device: a copy from the host would make the GPU wait
    return (torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1))
