"""The timm ViT family: DINO, DINOv2 (with / without registers), DINOv3, CLIP, supervised ViT.

Every entrypoint takes the same keywords (see :func:`timm_entrypoint`). Features come from
``forward_intermediates`` with ``dynamic_img_size=True``, so positional embeddings are
interpolated to any (padded) image size.
"""
from __future__ import annotations

from ._timm import timm_entrypoint
from .base import CLIP_MEAN, CLIP_STD, BackboneCfg


# (name, timm model with weights tag, stride, dim, description)
_VITS: list[tuple[str, str, int, int, str]] = [
    ("dino_vits8", "vit_small_patch8_224.dino", 8, 384, "DINO ViT-S/8"),
    ("dino_vits16", "vit_small_patch16_224.dino", 16, 384, "DINO ViT-S/16"),
    ("dino_vitb8", "vit_base_patch8_224.dino", 8, 768, "DINO ViT-B/8"),
    ("dino_vitb16", "vit_base_patch16_224.dino", 16, 768, "DINO ViT-B/16"),
]
for _size, _dim in (("small", 384), ("base", 768), ("large", 1024), ("giant", 1536)):
    _s = _size[0]
    _VITS.append((f"dinov2_vit{_s}14", f"vit_{_size}_patch14_dinov2.lvd142m", 14, _dim,
                  f"DINOv2 ViT-{_s.upper()}/14"))
    _VITS.append((f"dinov2_vit{_s}14_reg", f"vit_{_size}_patch14_reg4_dinov2.lvd142m", 14, _dim,
                  f"DINOv2 ViT-{_s.upper()}/14 with 4 registers"))
for _name, _arch, _dim in (("vits16", "small", 384), ("vits16plus", "small_plus", 384),
                           ("vitb16", "base", 768), ("vitl16", "large", 1024),
                           ("vith16plus", "huge_plus", 1280), ("vit7b16", "7b", 4096)):
    _VITS.append((f"dinov3_{_name}", f"vit_{_arch}_patch16_dinov3.lvd1689m", 16, _dim,
                  f"DINOv3 {_name} (LVD-1689M)"))

for _name, _timm_name, _stride, _dim, _doc in _VITS:
    timm_entrypoint(BackboneCfg(_name, _timm_name, _stride, _dim), _doc)

vits16 = timm_entrypoint(
    BackboneCfg("vits16", "vit_small_patch16_224.augreg_in21k_ft_in1k", 16, 384, (0.5,) * 3, (0.5,) * 3),
    "Supervised ViT-S/16 (AugReg, ImageNet-21k then 1k)")
clip_vitb16 = timm_entrypoint(
    BackboneCfg("clip_vitb16", "vit_base_patch16_clip_224.openai", 16, 768, CLIP_MEAN, CLIP_STD),
    "OpenAI CLIP ViT-B/16 image tower (block tokens, before the projection)")
