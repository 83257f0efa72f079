"""torch.hub entry points: this project's ViT sizes, and any DINO ViT weights file. No network.

    import torch
    model = torch.hub.load("/path/to/this/clone", "from_file", path="backbone.pth", source="local")
    model = torch.hub.load("/path/to/this/clone", "vit_small", patch_size=8, source="local")

`from_file` reads what checkpoint.load_backbone reads: an export of `knn_eval.py --export`, the authors'
released dino_*_pretrain.pth backbones and their full checkpoints, and a checkpoint.pth of
dino.py (its teacher by default); the ViT is sized from the weights. The size entries build an
untrained ViT (vit.py's sizes; img_size is the side its position embedding is made for, and
other sides are interpolated). Every model returns the final-LayerNorm'd [CLS] token, (B, D),
takes ImageNet-normalised images whose sides are multiples of the patch size, and has
get_last_selfattention and get_intermediate_layers. The authors' own hub entries download their
weights: torch.hub.load("facebookresearch/dino:main", "dino_vits16").
"""

import checkpoint
import vit

dependencies = ["torch", "torchvision", "einops", "numpy", "PIL"]


def vit_nano(patch_size: int = 16, img_size: int = 224, **kwargs):
    """This project's CPU size: D = 64, 4 blocks, 4 heads (it trains on shapes with patch 4, 32 px)."""
    return vit.vit_nano(patch_size, img_size=img_size, **kwargs)


def vit_tiny(patch_size: int = 16, img_size: int = 224, **kwargs):
    """ViT-Tiny: D = 192, 12 blocks, 3 heads."""
    return vit.vit_tiny(patch_size, img_size=img_size, **kwargs)


def vit_small(patch_size: int = 16, img_size: int = 224, **kwargs):
    """ViT-Small (the authors' DeiT-S): D = 384, 12 blocks, 6 heads."""
    return vit.vit_small(patch_size, img_size=img_size, **kwargs)


def vit_base(patch_size: int = 16, img_size: int = 224, **kwargs):
    """ViT-Base: D = 768, 12 blocks, 12 heads."""
    return vit.vit_base(patch_size, img_size=img_size, **kwargs)


def from_file(path, weights: str = "teacher", num_heads: int | None = None):
    """The ViT backbone in a weights file, loaded strictly, in eval mode; `weights` picks the
    teacher or the student of a full checkpoint, num_heads a width outside vit.ARCHS."""
    return checkpoint.load_backbone(path, weights, num_heads)
