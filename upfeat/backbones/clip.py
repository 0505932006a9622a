"""MaskCLIP (Zhou et al., ECCV 2022): dense CLIP features from the last block's value path.

CLIP's last attention block pools everything into the CLS token, so its patch tokens are poor
dense features. MaskCLIP drops the query/key attention of the last block: each token's features
are ``out_proj(v)`` with ``v`` its own value vector, without the residual and MLP (adding them
back hurts, as the authors and FeatUp's MaskCLIP both found). With ``norm=True`` the result goes
through CLIP's ``ln_post`` and projection, landing in the joint image-text space (512 channels for
ViT-B/16), so text embeddings score it directly.
"""
from __future__ import annotations

import dataclasses
import os

import torch
from torch import nn

from ._registry import register_backbone
from ._timm import TimmBackbone, create_timm_model
from .base import CLIP_MEAN, CLIP_STD, Backbone, BackboneCfg


class MaskClipBackbone(TimmBackbone):
    """A timm CLIP ViT (``VisionTransformer`` with a projection head) read out the MaskCLIP way."""

    def __init__(self, model: nn.Module, name: str, timm_name: str, norm: bool = True) -> None:
        super().__init__(model, name, timm_name, layers=None, norm=norm)
        if norm and isinstance(model.head, nn.Linear):  # CLIP projection into the text space
            self.cfg = dataclasses.replace(self.cfg, dim=model.head.out_features)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        h, w = m.patch_embed.dynamic_feat_size(x.shape[-2:])
        t = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        for blk in m.blocks[:-1]:
            t = blk(t)
        attn = m.blocks[-1].attn
        qkv = attn.qkv(m.blocks[-1].norm1(t))  # fused layout (3, heads, head_dim) on the last axis
        v = attn.proj(attn.norm(qkv.chunk(3, dim=-1)[2]))
        if self.norm:
            v = m.head(m.norm(v))
        v = v[:, m.num_prefix_tokens:]
        return v.transpose(1, 2).reshape(v.shape[0], v.shape[2], h, w)


@register_backbone(BackboneCfg("maskclip_vitb16", "vit_base_patch16_clip_224.openai", 16, 512,
                               CLIP_MEAN, CLIP_STD))
def maskclip_vitb16(pretrained: bool = True, weights: str | os.PathLike[str] | None = None,
                    norm: bool = True, device: str | torch.device | None = None,
                    **model_kw) -> Backbone:
    """MaskCLIP on OpenAI CLIP ViT-B/16: stride 16, dim 512 (768 with ``norm=False``).

    Same keywords as the ViT entrypoints, except ``layers`` (always the last block's value path).
    """
    timm_name = "vit_base_patch16_clip_224.openai"
    # keep the classifier head: for CLIP it is the image->text projection
    model_kw.setdefault("num_classes", 512)
    model = create_timm_model(timm_name, "maskclip_vitb16", pretrained, weights, device, **model_kw)
    backbone = MaskClipBackbone(model, "maskclip_vitb16", timm_name, norm)
    return backbone.to(device) if device is not None else backbone
