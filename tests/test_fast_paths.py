"""The fast paths a GPU run takes (no host-device sync in a step, bf16 autocast, fused AdamW,
torch.compile), checked on the CPU: each is the code a CUDA run executes, or its CPU twin."""

import dataclasses
import math

import pytest
import torch
from einops import rearrange

import augment
import data
import dino


def tiny(**changes):
    cfg = dino.Config(arch="vit_nano", patch_size=8, global_crops_size=16, local_crops_size=8,
                      local_crops_number=2, out_dim=16, hidden_dim=16, bottleneck_dim=8,
                      batch_size=4, epochs=2, warmup_epochs=0, drop_path_rate=0.1,
                      freeze_last_layer=0, device="cpu", output_dir="unused")
    cfg = dataclasses.replace(cfg, **changes)
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    shapes = data.ImageSet(labels=torch.zeros(8, dtype=torch.long), classes=["a"], images=x)
    return cfg, shapes


def trainer_for(cfg, shapes):
    torch.manual_seed(0)
    return dino.Trainer(cfg, shapes, None, quiet=True)


def test_a_step_reads_nothing_back_from_the_device(monkeypatch):
    """On a GPU, reading a value on the host (item, bool, float, tolist ...) or copying one to the
    device waits for every queued kernel. Making the views and a whole training step must do
    neither: the only host reads allowed are of the schedules, which are precomputed on the host.
    Checked by making every such read raise; the augmentation runs in its GPU mode (every
    operation on every image, then select), which is what CUDA tensors get."""
    cfg, shapes = tiny()
    trainer = trainer_for(cfg, shapes)
    allowed = {t.untyped_storage().data_ptr() for t in trainer.schedule.values()}
    computing_all = augment.where_images
    monkeypatch.setattr(augment, "where_images",
                        lambda *args, **kw: computing_all(*args, **{**kw, "every_image": True}))
    reads = []

    def forbid(name, original):
        def read(t, *args, **kwargs):
            if t.untyped_storage().data_ptr() not in allowed:
                reads.append(name)
                raise AssertionError(f"host read of a device tensor: Tensor.{name}")
            return original(t, *args, **kwargs)
        return read

    def no_copy(*args, **kwargs):
        reads.append("torch.tensor")
        raise AssertionError("a tensor made from host data inside the step")

    def step(it):
        views = dino.multicrop(shapes.images[:4], cfg, dino.step_generator(cfg.seed, 0, it, "cpu"))
        return trainer.step(views, it)

    step(0)  # the first step makes the constants (normalisation) and the optimizer's state once
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
            m.setattr(torch.Tensor, name, forbid(name, getattr(torch.Tensor, name)))
        m.setattr(torch, "tensor", no_copy)
        teacher = [p.clone() for p in trainer.teacher.parameters()]
        loss, stats = step(1)
        loss, stats = step(2)
    assert reads == []
    # the steps did train: the fused optimizer stepped the student, the EMA moved the teacher
    assert math.isfinite(loss.item()) and stats["teacher_entropy"].item() > 0
    assert trainer.optimizer.state[next(trainer.student.parameters())]["step"].item() == 3
    assert any(not torch.equal(a, b) for a, b in zip(teacher, trainer.teacher.parameters()))
    # ... and the check above is live: a host read in the step is caught
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "item", forbid("item", torch.Tensor.item))
        with pytest.raises(AssertionError, match="Tensor.item"):
            loss.item()


def test_fused_adamw_makes_the_textbook_first_step():
    """The optimizer (fused AdamW on every device) against AdamW by hand. On the first step the
    bias-corrected moments are m̂ = g and v̂ = g², so
    θ ← θ (1 − lr · wd) − lr · g / (|g| + ε), with wd = 0 for biases and 1-D parameters and lr, wd
    the schedules' values at step 0."""
    cfg, shapes = tiny(weight_decay=0.3, lr=0.05)
    trainer = trainer_for(cfg, shapes)
    before = {n: p.detach().clone() for n, p in trainer.student.named_parameters()}
    views = dino.multicrop(shapes.images[:4], cfg, dino.step_generator(0, 0, 0, "cpu"))
    trainer.step(views, 0)
    lr, wd = float(trainer.schedule["lr"][0]), float(trainer.schedule["wd"][0])
    assert lr == pytest.approx(0.05 * 4 / 256) and wd == pytest.approx(0.3)
    eps = trainer.optimizer.defaults["eps"]
    checked = 0
    for n, p in trainer.student.named_parameters():
        g = p.grad  # the clipped gradient the optimizer saw (it does not clear it)
        if g is None:  # not trained (the last layer's fixed norm): unchanged
            assert not p.requires_grad and torch.equal(p, before[n]), n
            continue
        decay = 0.0 if p.ndim <= 1 or n.endswith(".bias") else wd
        expected = before[n] * (1 - lr * decay) - lr * g / (g.abs() + eps)
        torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=1e-5, msg=n)
        checked += decay > 0
    assert checked >= 10  # the weight matrices were decayed, not only the 1-D parameters moved


def test_bf16_autocast_runs_the_networks_in_bf16_and_the_loss_in_fp32():
    """--precision bf16 (the CUDA default): the networks' matrix products run in bf16, the loss,
    the weights and the center stay fp32, and the loss is the fp32 loss within bf16's precision."""
    cfg, shapes = tiny(drop_path_rate=0.0)
    views = dino.multicrop(shapes.images[:4], cfg, dino.step_generator(0, 0, 0, "cpu"))
    results = {}
    for precision in ("fp32", "bf16"):
        trainer = trainer_for(dataclasses.replace(cfg, precision=precision), shapes)
        seen = []
        trainer.student.head.last_layer.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
        loss, stats = trainer.step(views, 0)
        results[precision] = loss.item()
        assert seen == [torch.bfloat16 if precision == "bf16" else torch.float32]
        assert loss.dtype == stats["teacher_entropy"].dtype == torch.float32
        assert trainer.center.dtype == torch.float32
        assert all(p.dtype == torch.float32 for p in trainer.student.parameters())
    assert results["bf16"] != results["fp32"]  # the precision did change
    assert results["bf16"] == pytest.approx(results["fp32"], abs=4e-2)


def test_compile_matches_eager():
    """--compile runs the same networks through torch.compile: the same loss and update."""
    cfg, shapes = tiny(local_crops_number=0, drop_path_rate=0.0)
    views = dino.multicrop(shapes.images[:4], cfg, dino.step_generator(0, 0, 0, "cpu"))
    results = []
    for compile in (False, True):
        trainer = trainer_for(dataclasses.replace(cfg, compile=compile), shapes)
        loss, _ = trainer.step(views, 0)
        results.append((loss.item(), trainer.student.state_dict()))
    (eager_loss, eager), (compiled_loss, compiled) = results
    assert compiled_loss == pytest.approx(eager_loss, abs=1e-5)
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], atol=1e-5, rtol=1e-4)


def test_auto_precision_is_bf16_on_gpus_and_fp32_on_cpus(monkeypatch):
    # a GPU that computes bf16 (Ampere or later); older ones: fp16, tests/test_conventions.py
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert dino.use_bf16("auto", torch.device("cuda", 0)) and not dino.use_bf16("auto", torch.device("cpu"))
    assert dino.use_bf16("bf16", torch.device("cpu")) and not dino.use_bf16("fp32", torch.device("cuda", 0))


def test_bf16_attention_on_a_cpu_is_the_explicit_softmax():
    """vit.Attention spells the softmax out for bf16 on a CPU (PyTorch's bf16 SDPA kernel is 5-7x
    slower there): its output equals the explicit path's bit for bit, where SDPA's would differ
    by bf16 rounding, and the fp32 (SDPA) output up to that rounding."""
    import vit
    attention = vit.Attention(dim=64, num_heads=4).eval()
    x = torch.randn(3, 17, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, attn = attention(x)
            explicit, _ = attention(x, return_attention=True)
            q, k, v = rearrange(attention.qkv(x), "b n (three h d) -> three b h n d", three=3, h=4)
            sdpa = attention.proj(rearrange(torch.nn.functional.scaled_dot_product_attention(
                q, k, v, scale=attention.scale), "b h n d -> b n (h d)"))
        exact, _ = attention(x)  # fp32: through SDPA
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, explicit) and not torch.equal(out, sdpa)
    torch.testing.assert_close(out.float(), exact, atol=3e-2, rtol=3e-2)


def test_benchmark_prints_every_figure_and_its_ratios_agree(capsys):
    """benchmark.py (a benchmark, not a timed test): it runs, and the ratios it prints are the
    quotients of the times it prints."""
    import benchmark
    assert benchmark.main(["--arch", "vit_nano", "--out_dim", "64", "--hidden_dim", "64",
                           "--bottleneck_dim", "32", "--batch_size", "16", "--local_crops_number", "2",
                           "--device", "cpu", "--steps", "1", "--warmup", "0",
                           "--options", "sdpa,precision"]) == 0
    out = capsys.readouterr().out
    ms = {line[:42].strip(): float(line.split()[-1]) for line in out.splitlines()
          if line.startswith(("whole step", "model only", "augment, batched", "augment, per image"))}
    assert len(ms) == 4 and all(v > 0 for v in ms.values())
    ratio = float(out.split("whole / model only = ")[1].split()[0])
    assert ratio == pytest.approx(ms["whole step"] / ms["model only (fwd+bwd+update)"], rel=2e-3)
    speedup = float(out.split("batched / per-image augmentation = ")[1].split("x")[0])
    # per-image views/s over batched views/s = batched time over per-image time, per batch
    assert speedup == pytest.approx(ms["augment, per image (authors', 1 process)"]
                                    / ms["augment, batched"], rel=0.05)
    assert "explicit softmax instead of SDPA" in out and "bf16 autocast instead of fp32" in out
    assert "peak memory: CPU RSS" in out
