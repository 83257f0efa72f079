"""DINO's math against hand-worked numbers and brute-force re-computations."""

import dataclasses
import math

import numpy as np
import pytest
import torch

import augment
import data
import dino


# -- paper defaults --------------------------------------------------------------------------------

def test_config_defaults_are_the_papers_imagenet_values():
    c = dino.Config()
    assert (c.arch, c.patch_size, c.drop_path_rate) == ("vit_small", 16, 0.1)
    assert (c.out_dim, c.hidden_dim, c.bottleneck_dim) == (65536, 2048, 256)
    assert c.norm_last_layer is True and c.use_bn_in_head is False
    assert c.student_temp == 0.1                                   # τ_s
    assert (c.warmup_teacher_temp, c.teacher_temp, c.warmup_teacher_temp_epochs) == (0.04, 0.07, 30)
    assert c.center_momentum == 0.9 and c.centering is True        # m
    assert c.momentum_teacher == 0.996                             # λ at step 0
    assert (c.global_crops_size, c.global_crops_scale) == (224, (0.4, 1.0))
    assert (c.local_crops_number, c.local_crops_size, c.local_crops_scale) == (8, 96, (0.05, 0.4))
    assert (c.optimizer, c.batch_size, c.epochs) == ("adamw", 64, 100)
    assert (c.lr, c.min_lr, c.warmup_epochs) == (0.0005, 1e-6, 10)
    assert (c.weight_decay, c.weight_decay_end, c.clip_grad, c.freeze_last_layer) == (0.04, 0.4, 3.0, 1)


def test_augmentation_table_is_the_authors():
    assert dino.VIEW_SPECS["global1"] == dino.ViewSpec(flip=0.5, jitter=0.8, gray=0.2, blur=1.0, solarize=0.0)
    assert dino.VIEW_SPECS["global2"] == dino.ViewSpec(flip=0.5, jitter=0.8, gray=0.2, blur=0.1, solarize=0.2)
    assert dino.VIEW_SPECS["local"] == dino.ViewSpec(flip=0.5, jitter=0.8, gray=0.2, blur=0.5, solarize=0.0)
    assert dino.JITTER == dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
    assert dino.BLUR_SIGMA == (0.1, 2.0)


# -- loss ------------------------------------------------------------------------------------------

L3 = math.log(3)


def test_loss_on_a_hand_worked_example():
    # B = 1, K = 2, 2 global + 1 local view, τ_s = τ_t = 1, c = 0.
    # teacher: view 0 → (1/2, 1/2), view 1 → (1/4, 3/4)
    # student: view 0 → (1/4, 3/4), view 1 → (1/2, 1/2), view 2 → (3/4, 1/4)
    teacher = torch.tensor([[0.0, 0.0], [0.0, L3]])
    student = torch.tensor([[0.0, L3], [0.0, 0.0], [L3, 0.0]])
    loss, stats = dino.dino_loss(student, teacher, torch.zeros(1, 2), tau_s=1.0, tau_t=1.0)
    h = lambda a, b: -sum(x * math.log(y) for x, y in zip(a, b))  # H(a, b) = -Σ a log b
    t0, t1 = (0.5, 0.5), (0.25, 0.75)
    s0, s1, s2 = (0.25, 0.75), (0.5, 0.5), (0.75, 0.25)
    # the 4 pairs with teacher view ≠ student view (t0,s0) and (t1,s1) are skipped
    expected = (h(t0, s1) + h(t0, s2) + h(t1, s0) + h(t1, s2)) / 4  # = 0.801028...
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert loss.item() == pytest.approx(0.801028, abs=1e-6)
    entropy = (h(t0, t0) + h(t1, t1)) / 2
    assert stats["teacher_entropy"].item() == pytest.approx(entropy, abs=1e-6)
    assert stats["kl"].item() == pytest.approx(expected - entropy, abs=1e-6)
    assert stats["pairs"][0, 0].item() == pytest.approx(h(t0, s0), abs=1e-6)  # computed, not used


def test_centering_and_sharpening_match_their_definition():
    torch.manual_seed(0)
    B, K = 4, 7
    student, teacher, center = torch.randn(10 * B, K), torch.randn(2 * B, K), torch.randn(1, K)
    loss, _ = dino.dino_loss(student, teacher, center, tau_s=0.1, tau_t=0.04)
    # brute force: loop over pairs and samples
    p_t = torch.softmax((teacher - center) / 0.04, -1).view(2, B, K)
    log_p_s = torch.log_softmax(student / 0.1, -1).view(10, B, K)
    terms = []
    for u in range(2):
        for v in range(10):
            if u != v:
                terms.append(sum(-(p_t[u, b] * log_p_s[v, b]).sum() for b in range(B)) / B)
    assert len(terms) == 18  # 2 global × (2 + 8 views − 1 same view)
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)


def test_teacher_gets_no_gradient():
    student = torch.randn(6, 5, requires_grad=True)
    teacher = torch.randn(4, 5, requires_grad=True)
    loss, _ = dino.dino_loss(student, teacher, torch.zeros(1, 5), 0.1, 0.04)
    loss.backward()
    assert teacher.grad is None and student.grad is not None


# -- EMAs --------------------------------------------------------------------------------------------

def test_center_ema_after_two_steps():
    c = torch.zeros(1, 3)
    g1 = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])  # batch mean (2, 2, 2)
    g2 = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 4.0]])  # batch mean (2, 0, 2)
    c = dino.update_center(c, g1, 0.9)
    c = dino.update_center(c, g2, 0.9)
    # c1 = 0.1·(2,2,2) = (.2,.2,.2); c2 = 0.9·c1 + 0.1·(2,0,2) = (.38, .18, .38)
    torch.testing.assert_close(c, torch.tensor([[0.38, 0.18, 0.38]]))


def test_teacher_ema_after_two_steps():
    student, teacher = torch.nn.Linear(2, 1, bias=False), torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        teacher.weight.copy_(torch.tensor([[1.0, 0.0]]))
        student.weight.copy_(torch.tensor([[0.0, 1.0]]))
    dino.update_teacher(teacher, student, 0.5)   # θ_t = (0.5, 0.5)
    with torch.no_grad():
        student.weight.copy_(torch.tensor([[2.0, 2.0]]))
    dino.update_teacher(teacher, student, 0.75)  # θ_t = 0.75·(0.5, 0.5) + 0.25·(2, 2) = (0.875, 0.875)
    torch.testing.assert_close(teacher.weight, torch.tensor([[0.875, 0.875]]))


# -- schedules -------------------------------------------------------------------------------------

def authors_schedule(base, final, epochs, niter_per_ep, warmup_epochs=0, start=0.0):
    """The authors' utils.cosine_scheduler, written out in numpy from its description: a warm-up
    np.linspace(start, base, W) over W = warmup_epochs · niter_per_ep iterations (it reaches base
    at its last one), then final + ½ (base − final)(1 + cos(π i / N)) for i = 0 … N − 1."""
    W = warmup_epochs * niter_per_ep
    N = epochs * niter_per_ep - W
    i = np.arange(N)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * i / N))
    return np.concatenate([np.linspace(start, base, W), cosine])


@pytest.mark.parametrize("epochs,steps,warmup", [(20, 10, 5), (100, 7, 10), (3, 1, 0), (4, 312, 1)])
def test_schedules_equal_the_authors_elementwise(epochs, steps, warmup):
    cfg = dino.Config(epochs=epochs, warmup_epochs=warmup, batch_size=512, warmup_teacher_temp_epochs=2)
    s = dino.schedules(cfg, steps_per_epoch=steps)
    peak = 0.0005 * 512 / 256  # linear scaling rule
    oracle = {"lr": authors_schedule(peak, 1e-6, epochs, steps, warmup),
              "wd": authors_schedule(0.04, 0.4, epochs, steps),
              "momentum": authors_schedule(0.996, 1.0, epochs, steps)}
    for name, expected in oracle.items():
        np.testing.assert_allclose(s[name].numpy(), expected, rtol=1e-7, atol=0, err_msg=name)
    # τ_t per epoch (the same for each of its iterations): np.linspace over its warm-up epochs, then constant
    tau = np.concatenate([np.linspace(0.04, 0.07, 2), np.full(epochs - 2, 0.07)])[:epochs]
    np.testing.assert_allclose(s["teacher_temp"].numpy(), np.repeat(tau, steps), rtol=1e-7, atol=0)


def test_schedule_landmarks_by_hand():
    lr = dino.cosine_schedule(1.0, 0.0, total_steps=6, warmup_steps=2)
    # warm-up linspace(0, 1, 2) = 0, 1; then 0.5 (1 + cos(π i / 4)) for i = 0 … 3
    c = math.cos(math.pi / 4)
    torch.testing.assert_close(lr, torch.tensor([0.0, 1.0, 1.0, 0.5 * (1 + c), 0.5, 0.5 * (1 - c)],
                                                dtype=torch.float64))


def test_warmup_longer_than_training_is_cut():
    lr = dino.cosine_schedule(1.0, 0.0, total_steps=4, warmup_steps=40)
    torch.testing.assert_close(lr, torch.linspace(0, 1, 40, dtype=torch.float64)[:4])


def test_teacher_temperature_warmup_longer_than_training():
    tau = dino.teacher_temp_schedule(dino.Config(epochs=3, warmup_teacher_temp_epochs=30))
    assert len(tau) == 3 and tau[0] == pytest.approx(0.04) and tau[2] < 0.05


# -- head and optimisation ---------------------------------------------------------------------------

def small_cfg(**kw):
    base = dict(arch="vit_nano", patch_size=4, global_crops_size=16, local_crops_size=8,
                local_crops_number=2, out_dim=32, hidden_dim=32, bottleneck_dim=16,
                batch_size=8, epochs=2, lr=0.01, warmup_epochs=0, device="cpu")
    base.update(kw)
    return dino.Config(**base)


def views_for(cfg, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
    return dino.multicrop(images, cfg, g)


def test_head_weight_norm_stays_one_and_last_layer_freezes():
    cfg = small_cfg(freeze_last_layer=1)
    shapes = data.make_shapes(16, seed=3, size=16)
    trainer = dino.Trainer(cfg, shapes, None, quiet=True)
    head = trainer.student.head
    v_before = head.last_layer.parametrizations.weight.original1.detach().clone()
    views = views_for(cfg)
    trainer.step(views, 0)  # epoch 0 < freeze_last_layer: last layer frozen
    torch.testing.assert_close(head.last_layer.parametrizations.weight.original1, v_before)
    mlp_before = head.mlp[0].weight.detach().clone()
    trainer.step(views, trainer.steps_per_epoch)  # epoch 1
    assert not torch.equal(head.last_layer.parametrizations.weight.original1, v_before)
    assert not torch.equal(head.mlp[0].weight, mlp_before)
    row_norms = head.last_layer.weight.norm(dim=1)
    torch.testing.assert_close(row_norms, torch.ones_like(row_norms))
    assert not head.last_layer.parametrizations.weight.original0.requires_grad


def test_no_weight_decay_on_one_dimensional_parameters():
    student, _ = dino.build_networks(small_cfg(), "cpu")
    decay, no_decay = dino.param_groups(student)
    assert no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    assert all(p.ndim <= 1 for p in no_decay["params"])
    names = {id(p): n for n, p in student.named_parameters()}
    assert any(names[id(p)].endswith("norm1.weight") for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == \
        sum(p.numel() for p in student.parameters() if p.requires_grad)


def test_gradient_clipping_is_per_parameter():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.4])  # norms 5 and 0.5
    model = torch.nn.Module()
    model.a, model.b = a, b
    dino.clip_gradients(model, 1.0)
    torch.testing.assert_close(a.grad, torch.tensor([0.6, 0.8]), atol=1e-5, rtol=0)
    torch.testing.assert_close(b.grad, torch.tensor([0.3, 0.4]))  # below the threshold: unchanged


def test_teacher_starts_equal_and_has_no_drop_path():
    student, teacher = dino.build_networks(small_cfg(drop_path_rate=0.2), "cpu")
    for (n, p), (_, q) in zip(student.state_dict().items(), teacher.state_dict().items()):
        assert torch.equal(p, q), n
    assert all(b.drop_path.p == 0 for b in teacher.backbone.blocks)
    assert student.backbone.blocks[-1].drop_path.p == pytest.approx(0.2)


# -- multi-crop ------------------------------------------------------------------------------------

def test_multicrop_shapes_and_teacher_sees_globals_only():
    cfg = small_cfg(local_crops_number=3)
    views = views_for(cfg)
    assert [tuple(v.shape) for v in views] == [(8, 3, 16, 16)] * 2 + [(8, 3, 8, 8)] * 3
    student, teacher = dino.build_networks(cfg, "cpu")
    assert student(views).shape == (5 * 8, 32)
    assert teacher(views[:2]).shape == (2 * 8, 32)


def test_crop_boxes_follow_scale_and_ratio():
    g = torch.Generator().manual_seed(0)
    boxes = augment.sample_crop_boxes(4000, 32, 32, (0.25, 1.0), generator=g)
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    area = h * w / 1024
    assert area.min() >= 0.2 and area.max() <= 1.0  # rounding may move the area slightly
    ratio = w / h
    assert ratio.min() >= 3 / 4 - 0.1 and ratio.max() <= 4 / 3 + 0.1


def test_crop_of_the_whole_image_is_the_image():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8)
    boxes = torch.tensor([[0.0, 0.0, 8.0, 8.0]] * 2)
    out = augment.crop_resize_flip(x, boxes, torch.tensor([False, True]), 8)
    torch.testing.assert_close(out[0], x[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], x[1].flip(-1), atol=1e-5, rtol=0)


def test_colour_ops_match_torchvision():
    import torchvision.transforms.v2.functional as TF
    torch.manual_seed(0)
    x = torch.rand(3, 3, 12, 12)
    f = torch.tensor([0.7, 1.0, 1.3]).view(3, 1, 1, 1)
    for mine, theirs in [(augment.adjust_brightness, TF.adjust_brightness),
                         (augment.adjust_contrast, TF.adjust_contrast),
                         (augment.adjust_saturation, TF.adjust_saturation)]:
        out = mine(x, f)
        for i in range(3):  # torchvision's luma weighs red 0.2989, PIL and this project 0.299
            torch.testing.assert_close(out[i], theirs(x[i], f[i].item()), atol=1e-4, rtol=0)
    shifts = torch.tensor([-0.1, 0.03, 0.1]).view(3, 1, 1, 1)
    out = augment.adjust_hue(x, shifts)
    for i in range(3):
        torch.testing.assert_close(out[i], TF.adjust_hue(x[i], shifts[i].item()), atol=1e-4, rtol=0)
    torch.testing.assert_close(augment.grayscale(x)[0, 0], TF.rgb_to_grayscale(x[0])[0], atol=1e-3, rtol=0)


def test_blur_matches_a_direct_convolution():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 10, 10)
    sigma = torch.tensor([0.5, 1.5])
    out = augment.gaussian_blur(x, sigma, 1.5)
    for i in range(2):
        r = 5  # ceil(3 · 1.5)
        k = torch.exp(-torch.arange(-r, r + 1.0) ** 2 / (2 * sigma[i] ** 2))
        k2d = torch.outer(k, k) / k.sum() ** 2
        padded = torch.nn.functional.pad(x[i:i + 1], (r, r, r, r), mode="reflect")
        ref = torch.nn.functional.conv2d(padded.transpose(0, 1), k2d[None, None]).transpose(0, 1)
        torch.testing.assert_close(out[i:i + 1], ref, atol=1e-5, rtol=0)


# -- data --------------------------------------------------------------------------------------------

def test_shapes_are_deterministic_and_balanced():
    a, b = data.make_shapes(400, seed=5), data.make_shapes(400, seed=5)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.images.dtype == torch.uint8 and a.images.shape == (400, 3, 32, 32)
    counts = torch.bincount(a.labels, minlength=8)
    assert counts.min() > 25  # 50 expected per class
    assert not torch.equal(data.make_shapes(400, seed=6).images, a.images)


def test_shapes_are_gray_and_their_brightness_hides_the_class():
    """Every image is gray (R = G = B), and the mean brightness varies far more within a class
    than between the class means: that one-number shortcut does not predict the class."""
    d = data.make_shapes(800, seed=2)
    x = d.images.float()
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
    mean = x[:, 0].mean((1, 2))
    class_means = torch.stack([mean[d.labels == k].mean() for k in range(8)])
    within = torch.stack([mean[d.labels == k].std() for k in range(8)])
    assert class_means.std() < 0.5 * within.mean()


def test_presets_apply_under_explicit_flags():
    cfg = dino.make_config({"epochs": 3}, image_size=32, name="cifar10")
    assert (cfg.patch_size, cfg.global_crops_size, cfg.local_crops_size, cfg.epochs) == (4, 32, 16, 3)
    assert cfg.output_dir.endswith("cifar10")
    assert dino.make_config({}, image_size=224, name="imagenet").arch == "vit_small"
    # every field is a flag
    flags = {a.dest for a in dino.build_parser()._actions}
    assert {f.name for f in dataclasses.fields(dino.Config)} <= flags
