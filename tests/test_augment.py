"""The batched augmentation against torchvision's functional ops (fixed parameters), and its
random parameters against the specification (frequencies and ranges over many draws)."""

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

import augment
import dino


def images(n=4, size=12, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- fixed parameters: pixel for pixel ---------------------------------------------------------------

@pytest.mark.parametrize("box,size", [((0, 0, 32, 32), 32), ((3, 5, 20, 24), 32),
                                      ((10, 2, 9, 7), 16), ((0, 16, 16, 16), 16),
                                      ((4, 1, 18, 19), 16), ((0, 0, 32, 32), 12)])  # shrunk: antialiased
@pytest.mark.parametrize("flip", [False, True])
def test_crop_resize_flip_matches_resized_crop(box, size, flip):
    x = images(1, 32)
    out = augment.crop_resize_flip(x, torch.tensor([box], dtype=torch.float32), torch.tensor([flip]), size)
    ref = TF.resized_crop(x[0], *box, [size, size], interpolation=InterpolationMode.BICUBIC,
                          antialias=True).clamp(0, 1)
    ref = TF.horizontal_flip(ref) if flip else ref
    torch.testing.assert_close(out[0], ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation", "hue"])
def test_each_jitter_factor_matches_torchvision(name):
    x = images()
    values = torch.tensor([0.6, 0.95, 1.2, 1.4]) if name != "hue" else torch.tensor([-0.1, -0.02, 0.05, 0.1])
    op = dict(zip(["brightness", "contrast", "saturation", "hue"], augment.JITTER_OPS))[name]
    theirs = getattr(TF, f"adjust_{name}")
    out = op(x, values)
    for i in range(len(x)):
        torch.testing.assert_close(out[i], theirs(x[i], values[i].item()), atol=2e-6, rtol=0)


def test_grayscale_and_solarize_match_torchvision():
    x = images()
    torch.testing.assert_close(augment.grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(augment.solarize(x), TF.solarize(x, 128 / 255))


def test_blur_matches_torchvision_for_each_sigma():
    x = images(3, 16)
    sigma = torch.tensor([0.3, 0.8, 1.5])
    out = augment.gaussian_blur(x, sigma, max_sigma=1.5)
    r = math.ceil(3 * 1.5)
    for i in range(3):
        ref = TF.gaussian_blur(x[i], [2 * r + 1, 2 * r + 1], [sigma[i].item()] * 2)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def fixed_params(n, **overrides):
    p = dict(box=torch.zeros(n, 4), flip=torch.zeros(n, dtype=torch.bool),
             jitter=torch.ones(n, dtype=torch.bool),
             factors=torch.tensor([[1.3, 0.7, 1.1, 0.05]] * n),
             order=torch.tensor([[3, 0, 2, 1], [0, 1, 2, 3], [1, 3, 0, 2]][:n]),
             gray=torch.tensor([False, True, False][:n]), blur=torch.tensor([True, False, True][:n]),
             sigma=torch.tensor([0.2, 0.2, 0.25][:n]), solarize=torch.tensor([True, False, False][:n]))
    p.update(overrides)
    return p


def test_photometric_is_torchvisions_ops_in_the_drawn_order():
    x, p = images(3, 16), fixed_params(3)
    max_sigma = dino.BLUR_SIGMA[1] * 16 / 224
    out = augment.photometric(x.clone(), p, max_sigma)
    r = max(1, math.ceil(3 * max_sigma))
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(3):
        ref = x[i]
        for k in p["order"][i].tolist():
            ref = ops[k](ref, p["factors"][i, k].item())
        if p["gray"][i]:
            ref = TF.rgb_to_grayscale(ref, num_output_channels=3)
        if p["blur"][i]:
            ref = TF.gaussian_blur(ref, [2 * r + 1] * 2, [p["sigma"][i].item()] * 2)
        if p["solarize"][i]:
            ref = TF.solarize(ref, 128 / 255)
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_selecting_and_computing_all_give_the_same_images():
    """where_images computes only the selected images on CPU and all of them on GPU."""
    x, mask, f = images(6), torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool), torch.rand(6) + 0.5
    a = augment.where_images(mask, augment.adjust_hue, x, f - 1, every_image=False)
    b = augment.where_images(mask, augment.adjust_hue, x, f - 1, every_image=True)
    torch.testing.assert_close(a, b)
    assert torch.equal(a[~mask], x[~mask]) and not torch.equal(a[mask], x[mask])


# -- random parameters: the specification ----------------------------------------------------------

def within(freq, p, n):
    """A frequency within 5 standard deviations of its probability (fails ~1 in 2 million)."""
    return abs(freq - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-12


@pytest.mark.parametrize("name", ["global1", "global2", "local"])
def test_random_parameters_follow_the_specification(name):
    n, spec, g = 20_000, dino.VIEW_SPECS[name], torch.Generator().manual_seed(1)
    scale = (0.05, 0.25) if name == "local" else (0.25, 1.0)
    p = dino.sample_view_params(n, 32, 32, 16, scale, spec, g)
    for key in ("flip", "jitter", "gray", "blur", "solarize"):
        freq = p[key].float().mean().item()
        assert within(freq, getattr(spec, key), n), (key, freq, getattr(spec, key))
    j = dino.JITTER
    for k, (lo, hi) in enumerate([(1 - j["brightness"], 1 + j["brightness"]),
                                  (1 - j["contrast"], 1 + j["contrast"]),
                                  (1 - j["saturation"], 1 + j["saturation"]), (-j["hue"], j["hue"])]):
        f = p["factors"][:, k]
        assert lo <= f.min() and f.max() <= hi
        assert f.min() < lo + 0.01 * (hi - lo) and f.max() > hi - 0.01 * (hi - lo)  # the whole range
        assert within((f < (lo + hi) / 2).float().mean().item(), 0.5, n)  # uniform: median at centre
    # the order is a permutation of the 4 ops, each op first a quarter of the time
    assert torch.equal(p["order"].sort(1).values, torch.arange(4).expand(n, 4))
    for k in range(4):
        assert within((p["order"][:, 0] == k).float().mean().item(), 0.25, n)
    lo, hi = (s * 16 / 224 for s in dino.BLUR_SIGMA)
    assert lo <= p["sigma"].min() and p["sigma"].max() <= hi
    top, left, h, w = p["box"].unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    area = h * w / 32 ** 2
    assert area.min() >= scale[0] * 0.8 and area.max() <= scale[1] * 1.2  # w, h are rounded to px


def test_views_do_not_depend_on_how_the_batch_is_split():
    """Parameters are drawn for the global batch, so two halves equal the whole (torchrun)."""
    cfg = dino.make_config({"local_crops_number": 2}, image_size=32, name="cifar10")
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    whole = dino.multicrop(x, cfg, dino.step_generator(0, 0, 0, "cpu"))
    halves = [dino.multicrop(x[r], cfg, dino.step_generator(0, 0, 0, "cpu"), batch=8, rows=r)
              for r in (slice(0, 4), slice(4, 8))]
    for v, (a, b) in zip(whole, zip(*halves)):
        torch.testing.assert_close(v, torch.cat([a, b]))

