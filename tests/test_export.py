"""The backbone out of the project: knn_eval.py --export writes the authors' *_pretrain.pth layout,
which vit.py, hubconf.py (torch.hub, source="local") and timm load strictly with identical outputs."""

from pathlib import Path

import pytest
import torch

import checkpoint
import dino
import knn_eval
import vit
from test_vit import authors_vit_keys

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint of dino.py for the built-in data's model (vit_nano/4 at 32 px) whose student
    differs from its teacher, so an export of the wrong network shows."""
    torch.manual_seed(0)
    cfg = dino.make_config(dict(out_dim=16, hidden_dim=16, bottleneck_dim=8), 32, "shapes")
    student, teacher = dino.build_networks(cfg, "cpu")
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("run") / "checkpoint.pth"
    torch.save({"student": student.state_dict(), "teacher": teacher.state_dict(),
                "config": dino.config_to_dict(cfg), "vit": {"embed_dim": 64, "depth": 4, "num_heads": 4}},
               path)
    return path, teacher.backbone.eval()


def test_export_round_trips_into_vit_and_through_hubconf(trained, tmp_path):
    """Acceptance 2: the export is a plain dict of tensors with exactly the authors' keys; it loads
    strictly into a ViT built by hand, through checkpoint.load_backbone, and through torch.hub from this
    clone, and each gives the teacher's features to the last bit."""
    path, teacher = trained
    lines = []
    out = tmp_path / "exported" / "dino_vitnano4_pretrain.pth"
    assert knn_eval.main(["--export", str(out), "--checkpoint", str(path)], log=lines.append) == 0
    assert "teacher backbone" in lines[-1] and "vit_nano/4 trained at 32 px" in lines[-1]
    exported = torch.load(out, weights_only=True)
    assert type(exported) is dict and all(torch.is_tensor(v) for v in exported.values())
    assert sorted(exported) == sorted(authors_vit_keys(4))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = teacher(x)
        by_hand = vit.VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4)
        by_hand.load_state_dict(exported, strict=True)
        assert torch.equal(by_hand.eval()(x), expected)
        assert torch.equal(checkpoint.load_backbone(out)(x), expected)
        hub_file = torch.hub.load(str(ROOT), "from_file", path=str(out), source="local")
        assert torch.equal(hub_file(x), expected)
        hub_size = torch.hub.load(str(ROOT), "vit_nano", patch_size=4, img_size=32, source="local")
        hub_size.load_state_dict(exported, strict=True)
        assert torch.equal(hub_size.eval()(x), expected)
        # the student's backbone on request
        knn_eval.main(["--export", str(tmp_path / "s.pth"), "--checkpoint", str(path),
                       "--weights", "student"], log=lambda *_: None)
        assert not torch.allclose(checkpoint.load_backbone(tmp_path / "s.pth")(x), expected)


def vit_small_16_shapes(key: str) -> tuple:
    """The shape of each tensor of the authors' dino_deitsmall16_pretrain.pth, from the ViT-S/16
    architecture: D = 384, 12 blocks, MLP 4 D = 1536, 14 x 14 patches of 16 px at 224 px."""
    D = 384
    shapes = {"cls_token": (1, 1, D), "pos_embed": (1, 14 * 14 + 1, D),
              "patch_embed.proj.weight": (D, 3, 16, 16), "attn.qkv.weight": (3 * D, D),
              "attn.qkv.bias": (3 * D,), "attn.proj.weight": (D, D), "mlp.fc1.weight": (4 * D, D),
              "mlp.fc1.bias": (4 * D,), "mlp.fc2.weight": (D, 4 * D)}
    return next((s for name, s in shapes.items() if key == name or key.endswith("." + name)), (D,))


def test_the_authors_vit_small_16_layout_loads_strictly_through_hubconf(tmp_path):
    generator = torch.Generator().manual_seed(0)
    authors = {k: torch.randn(vit_small_16_shapes(k), generator=generator) for k in authors_vit_keys(12)}
    torch.save(authors, tmp_path / "dino_deitsmall16_pretrain.pth")
    model = torch.hub.load(str(ROOT), "from_file", path=str(tmp_path / "dino_deitsmall16_pretrain.pth"),
                           source="local")
    assert (vit.describe(model), model.img_size) == ("vit_small/16", 224)
    state = model.state_dict()
    assert sorted(state) == sorted(authors) and all(torch.equal(state[k], authors[k]) for k in authors)
    untrained = torch.hub.load(str(ROOT), "vit_small", patch_size=16, source="local")
    untrained.load_state_dict(authors, strict=True)  # the size entry takes the same layout


def test_timm_loads_the_export_with_identical_outputs(trained, tmp_path):
    """The README's timm recipes: VisionTransformer(num_classes=0, global_pool="token") of the run's
    size for vit_nano, and timm.create_model for a named size."""
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer
    path, teacher = trained
    knn_eval.main(["--export", str(tmp_path / "b.pth"), "--checkpoint", str(path)], log=lambda *_: None)
    exported = torch.load(tmp_path / "b.pth", weights_only=True)
    model = VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4,
                              num_classes=0, global_pool="token")
    model.load_state_dict(exported, strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), teacher(x), rtol=1e-5, atol=1e-6)
        small = vit.vit_small(8, img_size=32).eval()
        named = timm.create_model("vit_small_patch16_224", num_classes=0, global_pool="token",
                                  img_size=32, patch_size=8)
        named.load_state_dict(small.state_dict(), strict=True)
        torch.testing.assert_close(named.eval()(x), small(x), rtol=1e-5, atol=1e-6)
