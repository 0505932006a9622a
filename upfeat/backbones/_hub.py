"""Where weights come from: the Hugging Face hub, its local cache, a user file, or upfeat's cache.

timm alone spends ~45 s retrying an unreachable hub before failing, so we decide up front: use a
cached hub file if there is one, else ask the hub with a short timeout and, when it is offline,
raise at once with instructions for ``weights=PATH``.
"""
from __future__ import annotations

import os
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch

from .._checks import UpfeatError

_TRUE = {"1", "true", "yes", "on"}


class OfflineError(UpfeatError, RuntimeError):
    """Pretrained weights were requested but the hub is unreachable and nothing is cached."""


def cache_dir() -> Path:
    """upfeat's cache: ``$UPFEAT_CACHE``, else ``$XDG_CACHE_HOME/upfeat``, else ``~/.cache/upfeat``."""
    if os.environ.get("UPFEAT_CACHE"):
        return Path(os.environ["UPFEAT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "upfeat"


def hub_reachable(timeout: float = 3.0) -> bool:
    """False if ``HF_HUB_OFFLINE`` is set or the hub does not answer HTTPS within ``timeout`` s.

    A real HTTPS request (certificate checked), not a bare TCP connect: some sandboxes accept
    TCP to any address. It runs in a thread because a hanging DNS lookup ignores socket timeouts.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return False
    url = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    ok: list[bool] = []

    def request() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            ok.append(True)
        except urllib.error.HTTPError:  # the server answered, even if with an error status
            ok.append(True)
        except (OSError, ValueError):
            pass

    thread = threading.Thread(target=request, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(ok)


def _hub_id(timm_name: str) -> str | None:
    import timm.models

    cfg = timm.models.get_pretrained_cfg(timm_name)
    return getattr(cfg, "hf_hub_id", None) if cfg is not None else None


def _cached_hub_file(hub_id: str | None) -> str | None:
    """Path of an already-downloaded checkpoint of ``hub_id`` in the HF cache, if any."""
    if not hub_id:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        path = try_to_load_from_cache(hub_id, filename)
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


def check_weights_path(weights: str | os.PathLike[str]) -> Path:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights={str(weights)!r} is not a file; pass a .safetensors or a "
                                f"timm / original checkpoint (.pth, .bin)")
    return path


def timm_pretrained_kwargs(name: str, timm_name: str, pretrained: bool,
                           weights: str | os.PathLike[str] | None) -> dict[str, Any]:
    """``timm.create_model`` keyword arguments loading the right weights, or raise ``OfflineError``.

    ``weights=PATH`` goes through timm's own file loader (safetensors, or ``torch.load`` with
    ``weights_only=True``) and the architecture's checkpoint filter, so timm hub files and the
    original DINO / DINOv2 / CLIP checkpoints both load.
    """
    if weights is not None:
        path = check_weights_path(weights)
        return {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}}
    if not pretrained:
        return {"pretrained": False}
    hub_id = _hub_id(timm_name)
    cached = _cached_hub_file(hub_id)
    if cached is not None:
        return {"pretrained": True, "pretrained_cfg_overlay": {"file": cached}}
    if not hub_reachable():
        where = f"https://huggingface.co/{hub_id}" if hub_id else "the timm model's source"
        raise OfflineError(
            f"backbone {name!r} needs pretrained weights for timm model {timm_name!r} from the "
            f"Hugging Face hub, which is not reachable (no network, or HF_HUB_OFFLINE is set), and "
            f"they are not in the local cache. Download the checkpoint elsewhere ({where}, file "
            f"model.safetensors) and pass weights=PATH (a .safetensors, or a timm / original "
            f".pth / .bin checkpoint); or use pretrained=False for random weights; or use the "
            f"offline backbone 'vits14_focus'.")
    return {"pretrained": True}


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file or a ``torch.save`` checkpoint (never unpickles code).

    Unwraps the usual ``{'state_dict': ...}`` / ``{'model': ...}`` containers and a DDP
    ``module.`` prefix.
    """
    path = check_weights_path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Any = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} does not contain a state dict, got {type(sd).__name__}")
    return {k.removeprefix("module."): v for k, v in sd.items()}
