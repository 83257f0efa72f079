"""--init_from: training starts from the authors' full checkpoint (backbone, head with weight_g /
weight_v, center), their backbone alone, or this project's checkpoint; shape mismatches are
one-line errors naming the tensor."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data
import dino
from test_vit import authors_vit_keys

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path, **changes):
    explicit = dict(arch="vit_nano", patch_size=8, global_crops_size=16, local_crops_size=8,
                    local_crops_number=2, out_dim=32, hidden_dim=24, bottleneck_dim=12,
                    use_bn_in_head=False, drop_path_rate=0.0, batch_size=16, epochs=1,
                    warmup_epochs=0, device="cpu", output_dir=str(tmp_path / "run"))
    return dino.make_config({**explicit, **changes}, 32, "shapes")


def authors_full_checkpoint(cfg, seed=0) -> dict:
    """A file as the authors' main_dino.py saves it (dino_*_pretrain_full_checkpoint.pth): the
    student under DistributedDataParallel (keys module.backbone.*, module.head.*), the teacher
    without it, the head's MLP (Linear, GELU, Linear, GELU, Linear: indices 0, 2, 4) and its
    weight-normalised last layer as weight_g (K, 1) and weight_v (K, bottleneck); the center in
    dino_loss; args as an argparse.Namespace. Every value is random, student unlike teacher."""
    generator = torch.Generator().manual_seed(seed)
    D, hidden, bottleneck, K = 64, cfg.hidden_dim, cfg.bottleneck_dim, cfg.out_dim
    grid = (cfg.global_crops_size // cfg.patch_size) ** 2
    backbone = {"cls_token": (1, 1, D), "pos_embed": (1, grid + 1, D),
                "patch_embed.proj.weight": (D, 3, cfg.patch_size, cfg.patch_size),
                "attn.qkv.weight": (3 * D, D), "attn.qkv.bias": (3 * D,), "attn.proj.weight": (D, D),
                "mlp.fc1.weight": (4 * D, D), "mlp.fc1.bias": (4 * D,), "mlp.fc2.weight": (D, 4 * D)}
    head = {"head.mlp.0.weight": (hidden, D), "head.mlp.0.bias": (hidden,),
            "head.mlp.2.weight": (hidden, hidden), "head.mlp.2.bias": (hidden,),
            "head.mlp.4.weight": (bottleneck, hidden), "head.mlp.4.bias": (bottleneck,),
            "head.last_layer.weight_g": (K, 1), "head.last_layer.weight_v": (K, bottleneck)}
    shapes = {"backbone." + k: next((s for name, s in backbone.items() if k == name or k.endswith("." + name)), (D,))
              for k in authors_vit_keys(4)}
    shapes.update(head)

    def network(prefix):
        return {prefix + k: 0.05 * torch.randn(s, generator=generator) + (1.0 if k.endswith("weight_g") else 0.0)
                for k, s in shapes.items()}

    return {"student": network("module."), "teacher": network(""), "optimizer": {"state": {}, "param_groups": []},
            "epoch": 100, "args": argparse.Namespace(arch="vit_nano", out_dim=K, lr=0.0005),
            "dino_loss": {"center": 0.1 * torch.randn(1, K, generator=generator)},
            "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0}}


def first_loss(trainer) -> float:
    losses = []
    trainer.fit(log=lambda *_: None, on_step=lambda it, loss, stats: losses.append(loss.item()))
    return losses[0]


def test_the_authors_full_checkpoint_gives_the_first_step_of_the_same_weights_loaded_by_hand(tmp_path):
    """Acceptance 3: the first step's loss from --init_from equals the loss of the same weights
    copied into the networks tensor by tensor, with the step's views and τ_t computed here."""
    full = authors_full_checkpoint(tiny_config(tmp_path))
    torch.save(full, tmp_path / "full.pth")
    cfg = tiny_config(tmp_path, init_from=str(tmp_path / "full.pth"))
    train = data.make_shapes(64, seed=0)
    trainer = dino.Trainer(cfg, train, None, quiet=True)
    messages = []
    dino.start_from_weights(trainer, log=messages.append)
    assert "backbones and heads, and the center" in messages[0]
    loss = first_loss(trainer)

    student, teacher = dino.build_networks(cfg, "cpu")
    with torch.no_grad():
        for network, weights, prefix in ((student, full["student"], "module."), (teacher, full["teacher"], "")):
            for name, p in network.backbone.named_parameters():
                p.copy_(weights[f"{prefix}backbone.{name}"])
            for i in (0, 2, 4):
                network.head.mlp[i].weight.copy_(weights[f"{prefix}head.mlp.{i}.weight"])
                network.head.mlp[i].bias.copy_(weights[f"{prefix}head.mlp.{i}.bias"])
            last = network.head.last_layer.parametrizations.weight
            last.original0.copy_(weights[f"{prefix}head.last_layer.weight_g"])  # g
            last.original1.copy_(weights[f"{prefix}head.last_layer.weight_v"])  # V
        views, _ = next(dino.train_batches(train, cfg, 0, "cpu"))
        tau_t = cfg.warmup_teacher_temp  # epoch 0 of the τ_t warm-up
        expected, _ = dino.dino_loss(student(views), teacher(views[:2]), full["dino_loss"]["center"],
                                     cfg.student_temp, tau_t)
    assert loss == pytest.approx(expected.item(), rel=1e-6)


def test_a_backbone_alone_starts_both_networks_and_this_projects_checkpoint_all(tmp_path):
    cfg = tiny_config(tmp_path)
    full = authors_full_checkpoint(cfg, seed=1)
    plain = {k: v for k, v in full["teacher"].items() if k.startswith("backbone.")}
    torch.save({k.removeprefix("backbone."): v for k, v in plain.items()}, tmp_path / "pretrain.pth")
    train = data.make_shapes(32, seed=0)
    fresh = dino.Trainer(tiny_config(tmp_path), train, None, quiet=True)
    trainer = dino.Trainer(tiny_config(tmp_path, init_from=str(tmp_path / "pretrain.pth")), train, None, quiet=True)
    dino.start_from_weights(trainer, log=lambda *_: None)
    for network in (trainer.student, trainer.teacher):
        state = network.state_dict()
        assert all(torch.equal(state[k], v) for k, v in plain.items())
        heads = {k: v for k, v in state.items() if k.startswith("head.")}  # as built: from the seed
        assert all(torch.equal(v, fresh.student.state_dict()[k]) for k, v in heads.items())
    assert torch.equal(trainer.center, torch.zeros_like(trainer.center))

    # this project's checkpoint: both networks and the center; the optimizer starts afresh
    first_loss(trainer)
    saved = torch.load(trainer.checkpoint_path, weights_only=True)
    again = dino.Trainer(tiny_config(tmp_path, init_from=str(trainer.checkpoint_path),
                                     output_dir=str(tmp_path / "again")), train, None, quiet=True)
    dino.start_from_weights(again, log=lambda *_: None)
    for network, role in ((again.student, "student"), (again.teacher, "teacher")):
        assert all(torch.equal(v, saved[role][k]) for k, v in network.state_dict().items())
    assert torch.equal(again.center, saved["center"]) and again.optimizer.state_dict()["state"] == {}
    assert not torch.equal(saved["student"]["backbone.cls_token"], saved["teacher"]["backbone.cls_token"])


def test_mismatched_weights_are_one_line_errors_naming_the_tensor(tmp_path):
    cfg = tiny_config(tmp_path)
    full = authors_full_checkpoint(cfg)
    torch.save(full, tmp_path / "full.pth")
    train = data.make_shapes(32, seed=0)
    cases = [(dict(out_dim=48), r"the student's head.last_layer.parametrizations.weight.original0 is "
                                r"\(32, 1\) in the file but \(48, 1\) .*--out_dim"),
             (dict(use_bn_in_head=True), r"the student's head.mlp.2.weight has no place in this "
                                        r"run's network; .*--use_bn_in_head"),  # 2: a BatchNorm there
             (dict(global_crops_size=24), r"backbone.pos_embed is \(1, 5, 64\) in the file but "
                                          r"\(1, 10, 64\).*--global_crops_size")]
    for changes, message in cases:
        trainer = dino.Trainer(tiny_config(tmp_path, init_from=str(tmp_path / "full.pth"), **changes),
                               train, None, quiet=True)
        with pytest.raises(data.DinoError, match=message):
            dino.start_from_weights(trainer, log=lambda *_: None)
    del full["teacher"]["head.last_layer.weight_v"]
    torch.save(full, tmp_path / "cut.pth")
    trainer = dino.Trainer(tiny_config(tmp_path, init_from=str(tmp_path / "cut.pth")), train, None, quiet=True)
    with pytest.raises(data.DinoError, match=r"the teacher has no head.last_layer.parametrizations"
                                             r".weight.original1 \(1 tensor\(s\) missing\)"):
        dino.start_from_weights(trainer, log=lambda *_: None)
    with pytest.raises(data.DinoError, match="--init_from must name an existing file"):
        dino.parse_config(["--init_from", str(tmp_path / "missing.pth")])
    # from the command line: the authors' ViT-S/16 into this project's default run (vit_nano/4)
    torch.save({k.removeprefix("backbone."): torch.zeros(1) for k in full["teacher"] if "backbone." in k}
               | {"cls_token": torch.zeros(1, 1, 384), "pos_embed": torch.zeros(1, 197, 384),
                  "patch_embed.proj.weight": torch.zeros(384, 3, 16, 16), "blocks.0.attn.qkv.weight":
                  torch.zeros(1152, 384), "blocks.0.mlp.fc1.weight": torch.zeros(1536, 384)},
               tmp_path / "vits16.pth")
    result = subprocess.run([sys.executable, str(ROOT / "dino.py"), "--init_from", str(tmp_path / "vits16.pth"),
                             "--device", "cpu", "--output_dir", str(tmp_path / "cli")], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert result.returncode != 0 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("error: --init_from") and "Traceback" not in result.stderr
    assert "(1, 1, 384) in the file but (1, 1, 64)" in lines[0] and "--arch" in lines[0], lines[0]
