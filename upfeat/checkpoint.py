"""Checkpoint files: tensors in safetensors, everything else as JSON; written atomically.

One checkpoint is one ``.safetensors`` file whose metadata holds the JSON config under the key
``"upfeat"`` (so a lone file is self-describing), plus, for exported models, a human-readable
sidecar ``<stem>.json`` with the same config. Nothing is pickled. Writes go to a temporary file in
the same directory, are fsync'ed and then ``os.replace``'d over the target, so a crash or SIGKILL at
any moment leaves either the old complete file or the new complete file, never a torn one.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import secrets
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ._checks import UpfeatError

META_KEY = "upfeat"


class CheckpointError(UpfeatError, ValueError):
    """A checkpoint file is missing, unreadable, or does not fit what it is loaded into."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened; rename is still atomic there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_temp(path: Path) -> Path:
    """A new empty file beside ``path``, named ``.<name>.<pid>.<random>.tmp``, with the mode
    ``open()`` would give (``0o666`` less the umask, applied by the OS: no umask read or set)."""
    while True:
        tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def atomic_write(path: str | os.PathLike[str], write) -> Path:
    """Call ``write(tmp_path)`` then atomically move the finished file to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the writer's pid in the name: a later run can tell a killed writer's file (stale_temps)
    tmp = _create_temp(path)
    try:
        write(tmp)  # writers truncate the file in place: it keeps its mode
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def weights_fingerprint(module: nn.Module) -> str:
    """Short hash of a module's class, config name and every parameter/buffer value."""
    h = hashlib.blake2b(digest_size=8)
    h.update(type(module).__qualname__.encode())
    h.update(str(getattr(getattr(module, "cfg", None), "name", "")).encode())
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def stale_temps(path: str | os.PathLike[str]) -> list[Path]:
    """Temporary files of :func:`atomic_write` for ``path`` whose writing process is gone
    (killed runs leave them; a live writer's, e.g. another rank's, are kept)."""
    path = Path(path)
    stale = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
                continue  # still running
            except ProcessLookupError:
                pass
            except PermissionError:
                continue  # someone else's live process
        elif pid.isdigit():
            continue  # ours: being written right now
        stale.append(tmp)
    return stale


def save_checkpoint(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor],
                    meta: dict, sidecar: bool = False) -> Path:
    """Write ``tensors`` + JSON ``meta`` to ``path`` (``.safetensors``) atomically.

    Args:
        tensors: name -> tensor (moved to CPU, made contiguous; shared storage is copied).
        meta: JSON-serialisable dict, stored in the file's metadata.
        sidecar: also write ``meta`` as ``<path without suffix>.json`` (atomically too).
    """
    text = json.dumps(meta, sort_keys=True)  # fails here, before anything is written
    cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    path = atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata={META_KEY: text}))
    if sidecar:
        atomic_write(path.with_suffix(".json"),
                     lambda tmp: tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n"))
    return path


def read_meta(path: str | os.PathLike[str]) -> dict:
    """The JSON config of a checkpoint: the ``<stem>.json`` sidecar if present, else the metadata."""
    path = _existing(path)
    side = path.with_suffix(".json")
    if side.is_file():
        try:
            return json.loads(side.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{side}: not valid JSON ({e})") from None
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            text = (f.metadata() or {}).get(META_KEY)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if text is None:
        raise CheckpointError(f"{path}: safetensors file without upfeat metadata and no "
                              f"{side.name} beside it; it is not an upfeat checkpoint")
    return json.loads(text)


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, meta)`` of a checkpoint written by :func:`save_checkpoint` (no pickle)."""
    path = _existing(path)
    meta = read_meta(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    return tensors, meta


# The checkpoint of a run folder of ``upfeat train``: the exported model, else the last
# training checkpoint. The one rule for every loader (upfeat.load, read_meta, load_checkpoint).
IN_FOLDER = ("model.safetensors", "checkpoints/last.safetensors")


def in_folder(folder: str | os.PathLike[str]) -> Path:
    """The checkpoint of a run folder: the first of :data:`IN_FOLDER` that exists in it."""
    for name in IN_FOLDER:
        if (folder / Path(name)).is_file():
            return Path(folder) / name
    raise CheckpointError(f"{folder}: folder has neither {' nor '.join(IN_FOLDER)}")


def _existing(path: str | os.PathLike[str]) -> Path:
    path = in_folder(path) if Path(path).is_dir() else Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def subdict(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Entries under ``prefix.`` with the prefix removed."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}


def load_module_state(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str,
                      source: str | os.PathLike[str]) -> None:
    """``module.load_state_dict(state, strict=True)`` with a one-line error naming the file."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = [f"missing {missing[:4]}" if missing else "",
                 f"unexpected {unexpected[:4]}" if unexpected else "",
                 f"shape mismatch (checkpoint vs model) {wrong[:3]}" if wrong else ""]
        raise CheckpointError(f"{source}: the {what} weights do not fit the {what} built from its "
                              f"config: " + "; ".join(p for p in parts if p))
    module.load_state_dict(state, strict=True)
