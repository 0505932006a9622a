"""upfeat.viz: PCA of feature maps as RGB, and PNG grids."""
from __future__ import annotations

import pytest
import torch

from upfeat._checks import ShapeError
from upfeat.viz import fit_pca, pca_rgb, save_grid


def _feats() -> torch.Tensor:
    """(2, 8, 6, 7) features: a strong known direction along x, a weaker one along y, noise."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 6), torch.linspace(-1, 1, 7), indexing="ij")
    d1, d2 = torch.zeros(8), torch.zeros(8)
    d1[0], d2[1] = 1.0, 1.0
    f = 10 * xx[None] * d1[:, None, None] + 3 * yy[None] * d2[:, None, None]
    return f[None].repeat(2, 1, 1, 1) + 0.01 * torch.randn(2, 8, 6, 7, generator=g)


def test_shapes_and_range() -> None:
    f = _feats()
    rgb = pca_rgb(f)
    assert rgb.shape == (2, 3, 6, 7) and rgb.min() >= 0 and rgb.max() <= 1
    assert pca_rgb(f[0]).shape == (3, 6, 7)


def test_components_follow_variance() -> None:
    f = _feats()
    basis = fit_pca(f)
    assert basis.components.shape == (3, 8)
    torch.testing.assert_close(basis.components[0].abs().argmax(), torch.tensor(0))
    torch.testing.assert_close(basis.components[1].abs().argmax(), torch.tensor(1))
    red = pca_rgb(f)[0, 0]
    assert (red[:, 1:] >= red[:, :-1] - 1e-6).all()  # red grows with x (sign fixed positive)


def test_reused_basis() -> None:
    f = _feats()
    basis = fit_pca(f[:1])
    torch.testing.assert_close(pca_rgb(f[:1], basis), pca_rgb(f[:1]))
    # one basis gives the same colours to the same features in another image (the third
    # component is pure noise here, so only the first two are compared)
    torch.testing.assert_close(pca_rgb(f[1:], basis)[:, :2], pca_rgb(f[:1], basis)[:, :2],
                               atol=0.02, rtol=0)
    with pytest.raises(ShapeError, match="fitted on 8 channels"):
        pca_rgb(torch.rand(1, 5, 2, 2), basis)


@pytest.mark.parametrize("bad, exc", [(torch.rand(8, 6), ShapeError),
                                      (torch.rand(1, 2, 4, 4), ShapeError),
                                      (torch.ones(1, 8, 4, 4, dtype=torch.int64), TypeError)])
def test_bad_inputs(bad: torch.Tensor, exc: type) -> None:
    with pytest.raises(exc):
        pca_rgb(bad)


def test_save_grid(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from PIL import Image

    path = tmp_path / "grid.png"
    save_grid([[torch.rand(3, 20, 30), pca_rgb(_feats()[0])], [torch.rand(3, 10, 10)]], path,
              titles=["image", "pca"], cell_inches=1.0)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (200, 200)
