"""One resolver of upsampler names (issue 17): registry name = CLI name = what ``create_model``
accepts, shipped weights as ``name:tag``, and ``import upfeat.upsamplers`` stays below the model."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from upfeat.backbones import wrap
from upfeat.checkpoint import CheckpointError
from upfeat.model import create_model, has_shipped_jbu
from upfeat.upsamplers import list_upsamplers, resolve_name
from upfeat.upsamplers.pretrained import PARAMETER_FREE, WEIGHTS


def test_names_and_tags():
    assert resolve_name("jbu") == resolve_name("jbu_stack") == resolve_name("jbu_stack:agnostic")
    assert resolve_name("jbu").file == WEIGHTS / "jbu.safetensors"
    assert resolve_name("jbu:vits14_focus").file == WEIGHTS / "vits14_focus_jbu.safetensors"
    for name in PARAMETER_FREE:
        assert resolve_name(name).file is None
    with pytest.raises(ValueError, match="unknown upsampler 'bilinar'. Did you mean: bilinear"):
        resolve_name("bilinar")
    with pytest.raises(ValueError, match="unknown weights tag of jbu_stack 'dinov2'"):
        resolve_name("jbu:dinov2")
    with pytest.raises(ValueError, match="'bilinear' has no weights, so no tag 'x'"):
        resolve_name("bilinear:x")


@pytest.mark.skipif(not has_shipped_jbu(), reason="upfeat/weights/jbu.safetensors missing")
def test_create_model_takes_every_registry_name():
    """Each registered name builds a model, or says in one line which weights to pass."""
    torch.manual_seed(0)
    bb = wrap(nn.Conv2d(3, 8, 4, stride=4), stride=4, dim=8, name="tiny")
    x = torch.rand(1, 3, 20, 28)
    for name in list_upsamplers():
        try:
            model = create_model(bb, name)
        except CheckpointError as e:
            assert name not in PARAMETER_FREE and "\n" not in str(e)
            assert f"pass a checkpoint (file or run folder of `upfeat train --upsampler {name}`)" in str(e)
            continue
        assert model.upsampler.name == name and model(x).shape == (1, 8, 20, 28)
    shipped = create_model(bb, "jbu")  # the agnostic JBU, re-shaped for dim 8, stride 4
    torch.testing.assert_close(shipped(x), create_model(bb, "jbu_stack")(x))


def test_importing_the_upsamplers_imports_no_backbone_and_no_model():
    code = ("import sys, upfeat.upsamplers, upfeat.upsamplers.implicit; "
            "print(sorted(m for m in sys.modules if m.startswith(('upfeat.backbones', 'upfeat.model'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_legacy_name_resolves_like_its_tag():
    """The pre-resolver name of the ViT's own JBU still names the same weights everywhere."""
    from upfeat.upsamplers.pretrained import resolve_name
    assert resolve_name("vits14_focus_jbu") == resolve_name("jbu_stack:vits14_focus")
