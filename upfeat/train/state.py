"""Optimiser and RNG state <-> (tensors, JSON) so training checkpoints need no pickle."""
from __future__ import annotations

import torch

from ..checkpoint import CheckpointError, subdict


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``opt.state_dict()`` into tensors ``{"optim.<param>.<key>": t}`` and JSON."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = v
            else:
                scalars[f"{pid}.{key}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
              for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           meta: dict, source: str) -> None:
    """Inverse of :func:`optimizer_to_tensors`, loaded into ``opt``."""
    state: dict[int, dict] = {}
    for name, v in subdict(tensors, "optim").items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = v
    for name, v in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()}
              for g in meta["param_groups"]]
    # torch only checks parameter counts; a moment buffer of the wrong shape would fail (or
    # broadcast) later inside step(), so compare shapes here.
    params = [p for g in opt.param_groups for p in g["params"]]
    ids = [i for g in groups for i in g["params"]]
    if len(ids) == len(params):
        for i, p in zip(ids, params):
            for key, v in state.get(i, {}).items():
                if isinstance(v, torch.Tensor) and v.ndim and v.shape != p.shape:
                    raise CheckpointError(f"{source}: optimiser state does not fit this model "
                                          f"(param {i} {key} {tuple(v.shape)} vs parameter "
                                          f"{tuple(p.shape)})")
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{source}: optimiser state does not fit this model ({e})") from None
