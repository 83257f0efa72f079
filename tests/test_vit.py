"""ViT: shapes on small crops, attention outputs, and the authors' checkpoint key layout."""

import pytest
import torch

import checkpoint
import data
import vit


def authors_vit_keys(depth):
    """The state-dict keys of the authors' released ViT checkpoints (dino_deitsmall16_pretrain.pth
    and its siblings): a [CLS] token, a position table, a conv patch embedding, the blocks, a norm."""
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


def test_interpolated_position_embedding_keeps_rows_and_columns_in_place():
    """A table whose channel 0 is the patch's row and channel 1 its column, resized from 8 x 8 to
    8 x 5: rows are kept exactly (the height is unchanged), so token k must sit in row k // 5
    (row-major, as the patches are flattened); columns keep their order within a row. A reshape
    that swapped rows and columns would put row values where columns belong and fail."""
    model = vit.vit_nano(patch_size=4, img_size=32)
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    with torch.no_grad():
        model.pos_embed.zero_()
        model.pos_embed[0, 1:, 0] = rows.flatten()
        model.pos_embed[0, 1:, 1] = cols.flatten()
        model.pos_embed[0, 0, :2] = -1.0  # [CLS] is not resized
        resized = model.interpolate_pos_encoding(8, 5)  # (1, 1 + 40, 64)
    assert resized.shape == (1, 41, 64)
    assert resized[0, 0, :2].tolist() == [-1.0, -1.0]
    token_rows = resized[0, 1:, 0]
    torch.testing.assert_close(token_rows, torch.arange(40.0) // 5, atol=1e-5, rtol=0)
    token_cols = resized[0, 1:, 1].view(8, 5)
    assert (token_cols[:, 1:] > token_cols[:, :-1]).all()  # left to right within every row
    torch.testing.assert_close(token_cols[:, 0], token_cols[0, 0].expand(8))  # same in every row


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


# -- the one weight loader (checkpoint.load_backbone), for knn_eval.py, visualize.py and dino.py -----------

def test_pretrained_weights_in_the_authors_formats(tmp_path):
    torch.manual_seed(0)
    state = vit.vit_small(patch_size=16).state_dict()
    full = {"teacher": {"backbone." + k: v for k, v in state.items()},
            "student": {"module.backbone." + k: v + 1 for k, v in state.items()}}
    torch.save(full, tmp_path / "full.pth")
    torch.save(state, tmp_path / "plain.pth")
    for name, weights, shift in [("full.pth", "student", 1), ("plain.pth", "teacher", 0)]:
        model = checkpoint.load_backbone(tmp_path / name, weights)
        assert (vit.describe(model), model.img_size, len(model.blocks)) == ("vit_small/16", 224, 12)
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k] + shift), k


def test_pretrained_tiny_vit_of_unusual_depth_gives_the_same_features(tmp_path):
    torch.manual_seed(0)
    original = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4).eval()
    weights = {"backbone." + k: v for k, v in original.state_dict().items()}
    weights["head.mlp.0.weight"] = torch.zeros(4, 64)  # the projection head is dropped
    torch.save({"teacher": weights, "student": {}}, tmp_path / "w.pth")
    model = checkpoint.load_backbone(tmp_path / "w.pth", "teacher")
    assert (vit.describe(model), model.img_size) == ("ViT D=64 depth 2 heads 4/8", 32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x))


def test_a_checkpoints_recorded_heads_beat_the_width_rule(tmp_path):
    """dino.py records the backbone's dimensions; a width-64 ViT with 2 heads (vit_nano has 4)
    must load with 2, or its attention would be split wrongly and its features differ."""
    torch.manual_seed(0)
    original = vit.VisionTransformer(img_size=16, patch_size=8, embed_dim=64, depth=1, num_heads=2).eval()
    torch.save({"teacher": {"backbone." + k: v for k, v in original.state_dict().items()},
                "student": {}, "vit": {"embed_dim": 64, "depth": 1, "num_heads": 2}}, tmp_path / "c.pth")
    model = checkpoint.load_backbone(tmp_path / "c.pth")
    assert model.num_heads == 2
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x))


@pytest.mark.parametrize("obj,message", [
    ({"state_dict": {"cls_token": torch.zeros(1, 1, 8)}}, "under the key 'state_dict'"),
    ({"conv1.weight": torch.zeros(8, 3, 7, 7)}, "holds no ViT backbone"),
    ({"teacher": {}}, "no ViT backbone"),
    ({"student": {"x": torch.zeros(1)}}, "no 'teacher' weights; try --weights student"),
    ([1, 2, 3], "not a state dict"),
])
def test_weights_that_are_no_vit_get_one_line_errors(tmp_path, obj, message):
    torch.save(obj, tmp_path / "w.pth")
    with pytest.raises(data.DinoError, match=message):
        checkpoint.load_backbone(tmp_path / "w.pth")
