"""ViT: shapes on small crops, attention outputs, and the authors' checkpoint key layout."""

import torch
import pytest

import vit


def authors_vit_keys(depth):
    """The state-dict keys of the authors' released ViT checkpoints (REFERENCE.md)."""
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(depth):
        for name in ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias",
                     "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
                     "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]:
            keys.append(f"blocks.{i}.{name}")
    return keys + ["norm.weight", "norm.bias"]


def test_vit_small_keys_match_authors_checkpoints():
    model = vit.vit_small(patch_size=16)
    state = model.state_dict()
    assert sorted(state) == sorted(authors_vit_keys(12))
    assert state["pos_embed"].shape == (1, 197, 384)  # 14 x 14 patches + [CLS] at 224 px
    assert state["patch_embed.proj.weight"].shape == (384, 3, 16, 16)
    # a dict in that layout loads with strict=True
    vit.vit_small(patch_size=16).load_state_dict(state, strict=True)


@pytest.mark.parametrize("arch,dim,depth,heads", [("vit_tiny", 192, 12, 3), ("vit_small", 384, 12, 6),
                                                  ("vit_base", 768, 12, 12)])
def test_paper_sizes(arch, dim, depth, heads):
    model = vit.build_vit(arch, 16)
    assert (model.embed_dim, len(model.blocks), model.num_heads) == (dim, depth, heads)


def test_global_and_local_crops_share_one_model():
    torch.manual_seed(0)
    model = vit.vit_nano(patch_size=4, img_size=32).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    assert model(torch.randn(5, 3, 16, 16)).shape == (5, 64)  # 4x4 grid: interpolated pos_embed
    attn = model.get_last_selfattention(torch.randn(2, 3, 16, 16))
    assert attn.shape == (2, 4, 17, 17)


def test_interpolated_position_embedding_is_identity_at_training_size():
    model = vit.vit_nano(patch_size=4, img_size=32)
    assert model.interpolate_pos_encoding(8, 8) is model.pos_embed
    # bicubic resize to the same grid reproduces the table (a check of the reshape order)
    resized = model.interpolate_pos_encoding(8, 9)[:, 1:]
    assert resized.shape == (1, 72, 64)


def test_explicit_attention_equals_sdpa_path():
    torch.manual_seed(0)
    model = vit.vit_nano(patch_size=4, img_size=32).eval()
    x = torch.randn(3, 3, 32, 32)
    tokens = model.prepare_tokens(x)
    for blk in model.blocks[:-1]:
        tokens = blk(tokens)
    last = model.blocks[-1]
    fused, _ = last.attn(last.norm1(tokens))
    explicit_attn = model.get_last_selfattention(x)  # (B, h, N, N)
    # recompute the explicit output from the returned weights and compare with the SDPA output
    q, k, v = last.attn.qkv(last.norm1(tokens)).reshape(3, 65, 3, 4, 16).permute(2, 0, 3, 1, 4)
    explicit = last.attn.proj((explicit_attn @ v).transpose(1, 2).reshape(3, 65, 64))
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explicit_attn.sum(-1), torch.ones(3, 4, 65))


def test_intermediate_layers_end_with_forward_output():
    torch.manual_seed(0)
    model = vit.vit_nano(patch_size=4, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    layers = model.get_intermediate_layers(x, n=2)
    assert len(layers) == 2 and layers[-1].shape == (2, 65, 64)
    torch.testing.assert_close(layers[-1][:, 0], model(x))


def test_drop_path_keeps_expectation_and_is_off_in_eval():
    dp = vit.DropPath(0.5)
    x = torch.ones(20000, 1)
    torch.manual_seed(0)
    out = dp(x)
    assert set(out.unique().tolist()) == {0.0, 2.0}
    assert abs(out.mean().item() - 1.0) < 0.03
    dp.eval()
    assert torch.equal(dp(x), x)


def test_input_not_multiple_of_patch_is_refused():
    model = vit.vit_nano(patch_size=4, img_size=32)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 3, 30, 30))
