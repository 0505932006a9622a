"""One name per thing: the output size is ``output_size`` everywhere; the registries share one
verb (``create``); old public names still work, with a ``DeprecationWarning``."""
from __future__ import annotations

import inspect

import pytest
import torch

from upfeat.downsamplers import SimpleDownsampler
from upfeat.jitter import View, apply_view, invert_view, warp_thetas
from upfeat.upsamplers import Bilinear
from upfeat.upsamplers.implicit import ImplicitFeatures


@pytest.mark.parametrize("fn", [Bilinear.forward, SimpleDownsampler.forward, apply_view, invert_view,
                                warp_thetas, ImplicitFeatures.query, ImplicitFeatures.forward])
def test_the_output_size_has_one_name(fn):
    assert "output_size" in inspect.signature(fn).parameters
    assert "out_size" not in inspect.signature(fn).parameters


def test_output_size_is_honoured_by_jitter_and_downsamplers():
    x = torch.rand(1, 3, 28, 42)
    assert apply_view(x, View(zoom=1.5), output_size=(14, 21)).shape == (1, 3, 14, 21)
    assert SimpleDownsampler(14)(x, output_size=(2, 3)).shape == (1, 3, 2, 3)


def test_the_implicit_fields_old_size_keyword_still_works_with_a_warning():
    f = ImplicitFeatures.untrained(torch.rand(1, 3, 10, 12), dim=6, pca_dim=3)
    with pytest.warns(DeprecationWarning, match=r"size= is deprecated; use output_size="):
        old = f.query(size=(20, 24))
    torch.testing.assert_close(old, f.query(output_size=(20, 24)))
    with pytest.raises(TypeError, match="not both"):
        f.query((20, 24), size=(20, 24))


def test_the_three_registries_share_one_verb():
    from upfeat import backbones, downsamplers, upsamplers
    assert all(callable(getattr(m, "create")) for m in (backbones, downsamplers, upsamplers))
    assert type(upsamplers.create("bilinear", dim=4, stride=2)).__name__ == "Bilinear"
    assert type(downsamplers.create("simple", dim=4, stride=2)).__name__ == "SimpleDownsampler"
    assert downsamplers.list_downsamplers("att*") == ["attention"]


@pytest.mark.parametrize("module, old", [("upsamplers", "create_upsampler"),
                                         ("downsamplers", "create_downsampler")])
def test_old_registry_names_still_work_with_a_warning(module, old):
    import importlib
    mod = importlib.import_module(f"upfeat.{module}")
    with pytest.warns(DeprecationWarning, match=rf"{old} is deprecated; use upfeat\.{module}\.create"):
        made = getattr(mod, old)(name := "simple" if module == "downsamplers" else "bilinear", 4, 2)
    assert type(made) is type(mod.create(name, 4, 2))
