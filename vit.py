"""The Vision Transformer backbone used by DINO, written out in full.

References:
  Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021 (the ViT).
  Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021 (DINO).

The module and parameter names are those of the DINO authors' released checkpoints
(`cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.{i}.norm1.*`, `blocks.{i}.attn.qkv.*`, ...),
so their published ViT weights load here with `load_state_dict(..., strict=True)`.

Shapes use: B batch, N tokens (patches + 1 [CLS]), D embedding width, h heads, d = D / h.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability p."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        # one Bernoulli(keep) per sample, broadcast over tokens and channels; divide by keep so
        # the expected value of the branch is unchanged
        mask = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(keep)
        return x * mask / keep


class PatchEmbed(nn.Module):
    """Cut the image into p x p patches and project each linearly to D (a conv with stride p)."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        x = self.proj(x)  # (B, D, H/p, W/p)
        return rearrange(x, "b d gh gw -> b (gh gw) d")


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    fused = True  # False: the explicit softmax everywhere (benchmark.py compares the two)

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    @staticmethod
    def slow_sdpa(dtype, device) -> bool:
        # PyTorch's CPU kernel for bf16 SDPA is 5-7x slower than the explicit product at these
        # lengths (17-65 tokens; torch 2.14 on an AVX512-BF16 EPYC), so bf16 on a CPU spells it out
        return dtype == torch.bfloat16 and torch.device(device).type == "cpu"

    def forward(self, x, return_attention: bool = False):
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        if return_attention or not self.fused or self.slow_sdpa(q.dtype, q.device):
            # $$A = \mathrm{softmax}(q k^\top / \sqrt{d})$$, spelled out so the weights can be returned
            attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)  # (B, h, N, N)
            out = attn @ v  # (B, h, N, d)
        else:
            # the same equation through PyTorch's fused kernel (flash / memory-efficient on GPU)
            attn = None
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, h, N, d)
        out = self.proj(rearrange(out, "b h n d -> b n (h d)"))
        return out, attn


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x)))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, return_attention: bool = False):
        y, attn = self.attn(self.norm1(x), return_attention=return_attention)
        if return_attention:
            return attn
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT whose forward returns the final-LayerNorm'd [CLS] token, shape (B, D)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.0):
        super().__init__()
        self.img_size = img_size  # the side its position embedding is made for (training resolution)
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        # drop-path rate rises linearly with depth, from 0 in the first block to the set rate
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def interpolate_pos_encoding(self, h_patches: int, w_patches: int):
        """Position embeddings for an (h_patches x w_patches) grid, resized bicubically."""
        n_stored = self.pos_embed.shape[1] - 1
        if h_patches * w_patches == n_stored and h_patches == w_patches:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        side = int(math.sqrt(n_stored))
        grid = rearrange(patch_pos, "1 (gh gw) d -> 1 d gh gw", gh=side, gw=side)
        # The authors pass scale_factor=(target + 0.1) / side to dodge a float rounding bug;
        # asking for the output size directly has no such bug, so we do that instead.
        grid = F.interpolate(grid.float(), size=(h_patches, w_patches), mode="bicubic",
                             align_corners=False).to(patch_pos.dtype)
        patch_pos = rearrange(grid, "1 d gh gw -> 1 (gh gw) d")
        return torch.cat([cls_pos, patch_pos], dim=1)  # (1, N, D)

    def prepare_tokens(self, x):
        B, _, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"input of {H}x{W} px is not a multiple of the patch size {p}; "
                             f"resize or crop it to a multiple of {p}")
        x = self.patch_embed(x)  # (B, N-1, D)
        cls = self.cls_token.expand(B, -1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1)  # (B, N, D)
        return x + self.interpolate_pos_encoding(H // p, W // p)

    def forward(self, x):
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]  # (B, D): the [CLS] token

    def get_last_selfattention(self, x):
        """Softmaxed attention of the last block, (B, heads, N, N); token 0 is [CLS]."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.blocks[-1](x, return_attention=True)

    def get_intermediate_layers(self, x, n: int = 1):
        """Normed outputs (all tokens) of the last n blocks, a list of (B, N, D)."""
        x = self.prepare_tokens(x)
        out = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if len(self.blocks) - i <= n:
                out.append(self.norm(x))
        return out


def _init_weights(m):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# Model sizes. tiny / small / base are the paper's (Table 1 of DINO; widths from DeiT).
# nano is this project's: small enough to train usefully on a 2-core laptop CPU in minutes.
ARCHS = {
    #            D    depth heads
    "vit_nano": (64, 4, 4),
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
}


def build_vit(arch: str, patch_size: int = 16, img_size: int = 224, **kwargs) -> VisionTransformer:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    dim, depth, heads = ARCHS[arch]
    return VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=dim, depth=depth,
                             num_heads=heads, **kwargs)


def vit_nano(patch_size: int = 16, **kwargs):
    return build_vit("vit_nano", patch_size, **kwargs)


def vit_tiny(patch_size: int = 16, **kwargs):
    return build_vit("vit_tiny", patch_size, **kwargs)


def vit_small(patch_size: int = 16, **kwargs):
    return build_vit("vit_small", patch_size, **kwargs)


def vit_base(patch_size: int = 16, **kwargs):
    return build_vit("vit_base", patch_size, **kwargs)


def untrained_like(model: VisionTransformer, seed: int = 0) -> VisionTransformer:
    """A freshly initialised ViT of model's size, from a generator seeded with seed (the global
    one is left as it was): the random-init baseline of the same network."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = VisionTransformer(img_size=model.img_size, patch_size=model.patch_size,
                                  embed_dim=model.embed_dim, depth=len(model.blocks),
                                  num_heads=model.num_heads,
                                  mlp_ratio=model.blocks[0].mlp.fc1.out_features / model.embed_dim)
    return fresh.eval()


def describe(model: VisionTransformer) -> str:
    """'vit_small/16' for a size in ARCHS, else its dimensions, e.g. 'ViT D=96 depth 3 heads 4/8'."""
    dims = (model.embed_dim, len(model.blocks), model.num_heads)
    name = next((arch for arch, sizes in ARCHS.items() if sizes == dims),
                f"ViT D={dims[0]} depth {dims[1]} heads {dims[2]}")
    return f"{name}/{model.patch_size}"
