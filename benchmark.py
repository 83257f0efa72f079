"""Where the time of a DINO training step goes.

    python benchmark.py                                   # built-in data, its preset
    python benchmark.py --data ./cifar10                  # CIFAR-10 preset (on a CPU vit_nano/4, on a GPU vit_tiny/4)
    python benchmark.py --data ./cifar10 --batch_size 64 --steps 5

Takes every flag of dino.py (the same presets apply) plus --steps, and prints, in samples/s
(one sample = one image, i.e. 2 global + V local views):

    whole step          augmentation + forward + backward + update, as `dino.py` trains
    model only          the same step on views made in advance (forward + backward + update)
    augment, batched    dino.multicrop on whole batches (in-memory data: CIFAR-10, shapes)
    augment, per image  the authors' pipeline: torchvision transforms on PIL images, one by one,
                        in this one process (their DataLoader runs it in worker processes)

then the ratio whole / model only, the speed-up of each model option on the model-only step
(the fused SDPA kernel vs the explicit softmax, bf16 vs fp32 autocast, torch.compile) with its
first-step loss next to the baseline's, and the peak memory. It is a benchmark, not a test:
all figures come from one run on one machine, so compare ratios, not absolute numbers.
"""

import argparse
import dataclasses
import math
import sys
import time

import torch

import augment
import data
import dino
import vit


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, steps, warmup):
    """Seconds per call of fn, after warm-up calls (compilation, caches, cuDNN autotuning)."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / steps


def authors_pipeline(cfg: dino.Config) -> list:
    """One torchvision transform per view, as the authors' DataAugmentationDINO (PIL in, tensor out)."""
    from torchvision.transforms import v2 as T
    views = []
    for name in dino.view_names(cfg.local_crops_number):
        spec, is_global = dino.VIEW_SPECS[name], name.startswith("global")
        size = cfg.global_crops_size if is_global else cfg.local_crops_size
        sigma = tuple(s * size / 224 for s in dino.BLUR_SIGMA)
        ops = [T.RandomResizedCrop(size, scale=cfg.global_crops_scale if is_global else cfg.local_crops_scale,
                                   interpolation=T.InterpolationMode.BICUBIC, antialias=True),
               T.RandomHorizontalFlip(spec.flip),
               T.RandomApply([T.ColorJitter(**dino.JITTER)], p=spec.jitter),
               T.RandomGrayscale(spec.gray)]
        if spec.blur:
            radius = max(1, math.ceil(3 * sigma[1]))
            ops.append(T.RandomApply([T.GaussianBlur(2 * radius + 1, sigma=sigma)], p=spec.blur))
        if spec.solarize:
            ops.append(T.RandomSolarize(128, p=spec.solarize))
        ops += [T.PILToTensor(), T.ToDtype(torch.float32, scale=True),
                T.Normalize(augment.IMAGENET_MEAN, augment.IMAGENET_STD)]
        views.append(T.Compose(ops))
    return views


def own_flags():
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--options", default="sdpa,precision,compile",
                        help="model options to compare, comma-separated (empty: none)")
    return parser


def main(argv=None):
    own, argv = own_flags().parse_known_args(argv)
    cfg = dino.parse_config(argv)
    name, train, _ = data.load_data(cfg.data)
    data.require(train.images is not None, "benchmark.py needs an in-memory data set (shapes or CIFAR-10)")
    trainer = dino.Trainer(cfg, train, None, quiet=True)
    device = trainer.device
    print(f"{name}: {cfg.arch}/{cfg.patch_size}, batch {cfg.batch_size}, 2x{cfg.global_crops_size} + "
          f"{cfg.local_crops_number}x{cfg.local_crops_size} px views, K={cfg.out_dim}, on {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f" ({torch.get_num_threads()} threads)"))
    fixed = time_the_step(trainer, own.steps, own.warmup)
    options = [o for o in own.options.split(",") if o]
    if options:
        compare_options(trainer, train, fixed, options, own.steps, own.warmup)
    print(data.peak_memory(device))
    return 0


def time_the_step(trainer, steps: int, warmup: int) -> list:
    """Samples/s of the whole step, of the model alone (fixed views) and of the augmentations,
    batched and per image as the authors' pipeline makes them; returns the fixed views."""
    cfg, device, n = trainer.cfg, trainer.device, trainer.cfg.batch_size
    images = trainer.train_set.images  # on the GPU when training there
    state = {"step": 0}

    def batch_views():
        state["step"] += 1
        idx = torch.randint(len(images), (n,), device=images.device)
        g = dino.step_generator(cfg.seed, 0, state["step"], device)
        return dino.multicrop(images[idx].to(device), cfg, g)

    fixed = batch_views()
    whole = timed(lambda: trainer.step(batch_views(), 0), device, steps, warmup)
    model = timed(lambda: trainer.step(fixed, 0), device, steps, warmup)
    batched = timed(batch_views, device, steps, warmup)
    # the authors' per-image pipeline, on PIL images, in this one process
    from torchvision.transforms.v2.functional import to_pil_image
    pil = [to_pil_image(img) for img in images[:n].cpu()]
    pipeline = authors_pipeline(cfg)
    per_image = timed(lambda: [[view(im) for view in pipeline] for im in pil],
                      torch.device("cpu"), max(1, steps // 2), 1)
    rows = [("whole step", whole), ("model only (fwd+bwd+update)", model), ("augment, batched", batched),
            ("augment, per image (authors', 1 process)", per_image)]
    print(f"{'':42s} {'samples/s':>10s} {'ms/step':>9s}")
    for label, seconds in rows:
        print(f"{label:42s} {n / seconds:10.1f} {1000 * seconds:9.1f}")
    print(f"whole / model only = {whole / model:.3f} (the model's share of the step: {model / whole:.0%})")
    print(f"batched / per-image augmentation = {per_image / batched:.1f}x the views/s")
    return fixed


def compare_options(trainer, train, fixed, options: list, steps: int, warmup: int):
    """The model-only step under each option (explicit attention, the other precision,
    torch.compile), from the same weights and views as the baseline."""
    cfg, device, n = trainer.cfg, trainer.device, trainer.cfg.batch_size
    start = {k: v.clone() for k, v in trainer.student.state_dict().items()}

    def measure(**changes):
        variant = dino.Trainer(dataclasses.replace(cfg, **changes), train, None, quiet=True)
        variant.student.load_state_dict(start)
        variant.teacher.load_state_dict(start)
        torch.manual_seed(0)
        loss = variant.step(fixed, 0)[0].item()
        return timed(lambda: variant.step(fixed, 0), device, steps,
                     warmup + (2 if changes.get("compile") else 0)), loss

    base_precision = "bf16" if trainer.bf16 else "fp32"
    explicit_anyway = trainer.bf16 and vit.Attention.slow_sdpa(torch.bfloat16, device)
    base, base_loss = measure()
    print(f"\nmodel-only step, options (baseline: {'explicit softmax' if explicit_anyway else 'SDPA'}, "
          f"{base_precision}, eager: {n / base:.1f} samples/s, first loss {base_loss:.5f})")
    trials = []
    if "sdpa" in options and not explicit_anyway:
        trials.append(("explicit softmax instead of SDPA", dict(), "explicit"))
    if "precision" in options:
        other = "fp32" if base_precision == "bf16" else "bf16"
        trials.append((f"{other} autocast instead of {base_precision}", dict(precision=other), None))
    if "compile" in options:
        trials.append(("torch.compile", dict(compile=True), None))
    for label, changes, attention in trials:
        vit.Attention.fused = attention != "explicit"
        try:
            seconds, loss = measure(**changes)
        except Exception as e:  # e.g. no C++ compiler for torch.compile: report and go on
            print(f"  {label:38s} failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
            continue
        finally:
            vit.Attention.fused = True
        print(f"  {label:38s} {n / seconds:8.1f} samples/s  speed-up {base / seconds:5.2f}x  "
              f"first loss {loss:.5f} (Δ {loss - base_loss:+.1e})")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except data.DinoError as e:
        sys.exit(f"error: {e}")
