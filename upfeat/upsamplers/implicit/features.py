"""A fitted implicit feature field: query it at any resolution or at any point, save and load it."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..._checks import ShapeError, check_floating, check_shape
from ..._deprecation import UNSET, renamed_keyword
from ...checkpoint import CheckpointError, load_checkpoint, load_module_state, save_checkpoint
from ..base import check_size
from .encoding import ImplicitMLP, pixel_centres, sample_colours, to_normalised

FORMAT = "upfeat.implicit"
VERSION = 1
CHUNK = 65536  # pixels per MLP call when querying: bounded activations (~35 MB at hidden 128)


class FeaturePCA(nn.Module):
    """A ``k``-dim PCA of ``C``-dim features, scaled so the codes have mean variance 1.

    ``encode(f) = (f - mean) @ components.T / scale``;
    ``decode(z) = mean + scale * z @ components``.
    Unit-variance codes make the learning rate and TV weight independent of the backbone's
    feature scale.

    Shape: ``mean (C,)``, ``components (k, C)`` orthonormal rows, ``scale ()``.
    """

    def __init__(self, mean: torch.Tensor, components: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("components", components)
        self.register_buffer("scale", scale.reshape(()))

    @classmethod
    def fit(cls, feats: torch.Tensor, k: int) -> FeaturePCA:
        """Fit on every pixel of ``feats`` ``(B, C, h, w)``; ``k`` is capped by ``C`` and by the
        number of pixels. Deterministic: exact eigendecomposition in float64, signs fixed so the
        largest loading of each component is positive."""
        from ...viz import principal_components
        x = feats.detach().double().permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
        k = max(1, min(k, x.shape[1], x.shape[0]))
        mean, comps, vals = principal_components(x, k)
        scale = vals.clamp_min(0).mean().sqrt().clamp_min(1e-8)
        dt = feats.dtype
        return cls(mean.to(dt), comps.to(dt), scale.to(dt))

    @property
    def k(self) -> int:
        return self.components.shape[0]

    def encode(self, feats: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` -> ``(B, k, h, w)``."""
        x = feats - self.mean[:, None, None]
        return torch.einsum("bchw,kc->bkhw", x, self.components) / self.scale

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``(N, k)`` -> ``(N, C)``."""
        return torch.addmm(self.mean, codes, self.components, alpha=float(self.scale))


class ImplicitFeatures(nn.Module):
    """Features of one image as a continuous function of position (and the image's colour).

    ``query(output_size)`` gives ``(1, C, H', W')`` for any size; ``query_points(xy)`` gives
    ``(N, C)`` at pixel coordinates of the fitted image (continuous, ``(x, y)``, pixel ``(i, j)``
    spans ``[j, j+1) x [i, i+1)``, its centre is ``(j + 0.5, i + 0.5)``). Colours at query points
    are bilinear samples of the fitted image, so ``query(output_size)`` sees the image resampled
    bilinearly to ``output_size``, and a grid query equals the point query at that grid's pixel
    centres.

    Attributes: ``mlp`` (:class:`ImplicitMLP`), ``pca`` (:class:`FeaturePCA`), ``image``
    ``(1, 3, H, W)`` in [0, 1], ``base`` ``(1, k, H, W)`` codes added to the network's (sampled
    bilinearly, like the colours) or ``None``, ``meta`` (JSON: backbone, schedule, fit statistics).

    Example:
        >>> f = ImplicitFeatures.untrained(torch.rand(1, 3, 20, 30), dim=12, pca_dim=4)
        >>> f.query((40, 60)).shape, f.query_points(torch.tensor([[0.5, 0.5]])).shape
        (torch.Size([1, 12, 40, 60]), torch.Size([1, 12]))
    """

    def __init__(self, mlp: ImplicitMLP, pca: FeaturePCA, image: torch.Tensor,
                 meta: dict | None = None, base: torch.Tensor | None = None) -> None:
        super().__init__()
        check_shape(image, ["1", "3", "H", "W"], "image")
        if image.shape[:2] != (1, 3):
            raise ShapeError(f"image must have shape (1, 3, H, W), got {tuple(image.shape)}")
        if mlp.fc3.out_features != pca.k:
            raise ShapeError(f"mlp outputs {mlp.fc3.out_features} codes but the PCA has {pca.k}")
        if base is not None and tuple(base.shape) != (1, pca.k, *image.shape[-2:]):
            raise ShapeError(f"base must be codes of shape (1, {pca.k}, {image.shape[-2]}, "
                             f"{image.shape[-1]}), got {tuple(base.shape)}")
        self.mlp, self.pca = mlp, pca
        self.register_buffer("image", image.detach().clone())
        self.register_buffer("base", None if base is None else base.detach().to(image.dtype,
                                                                                   copy=True))
        flat = image.detach().flatten(2)[0]
        # Colours are min-max scaled per channel to [-0.5, 0.5] over the *fitted* image (as
        # FeatUp); keeping lo/hi fixed makes queries at other sizes use the same mapping.
        self.register_buffer("colour_lo", flat.min(1).values)
        self.register_buffer("colour_hi", flat.max(1).values)
        self.meta = dict(meta or {})

    @classmethod
    def untrained(cls, image: torch.Tensor, dim: int, pca_dim: int = 8,
                  **mlp_kw) -> ImplicitFeatures:
        """A randomly initialised field (tests and docs): identity-like PCA of ``dim`` channels."""
        pca = FeaturePCA(torch.zeros(dim), torch.eye(pca_dim, dim), torch.ones(()))
        return cls(ImplicitMLP(pca_dim, **mlp_kw), pca, image).eval()

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.image.shape[-2]), int(self.image.shape[-1])

    @property
    def dim(self) -> int:
        return int(self.pca.mean.shape[0])

    def inputs(self, xy: torch.Tensor) -> torch.Tensor:
        """Network inputs ``(N, 5)`` = normalised ``(x, y)`` and scaled colour at pixel coords."""
        grid = to_normalised(xy.to(self.image.dtype), self.image_size)
        rgb = sample_colours(self.image, grid)
        rgb = (rgb - self.colour_lo) / (self.colour_hi - self.colour_lo).clamp_min(1e-4) - 0.5
        return torch.cat([grid, rgb], 1)

    def base_codes(self, xy: torch.Tensor) -> torch.Tensor | None:
        """The base map's codes ``(N, k)`` at pixel coords ``(N, 2)`` (bilinear), or ``None``."""
        if self.base is None:
            return None
        g = to_normalised(xy.to(self.base.dtype), self.image_size).view(1, 1, -1, 2)
        out = F.grid_sample(self.base, g, mode="bilinear", padding_mode="border",
                            align_corners=False)
        return out[0, :, 0].T

    def codes(self, xy: torch.Tensor) -> torch.Tensor:
        """PCA codes ``(N, k)`` at pixel coords ``(N, 2)``: the network (+ the base map)."""
        out = self.mlp(self.inputs(xy))
        b = self.base_codes(xy)
        return out if b is None else out + b

    @torch.no_grad()
    def query_points(self, xy: torch.Tensor) -> torch.Tensor:
        """Features ``(N, C)`` at ``(x, y)`` pixel coordinates ``(N, 2)`` of the fitted image."""
        check_shape(xy, ["N", "2"], "xy")
        check_floating(xy, "xy")
        if xy.shape[1] != 2:
            raise ShapeError(f"xy must have shape (N, 2) of (x, y) pixel coordinates, got "
                             f"{tuple(xy.shape)}")
        if not torch.isfinite(xy).all():
            raise ValueError("xy holds non-finite coordinates")
        xy = xy.to(self.image.device)
        return torch.cat([self.pca.decode(self.codes(xy[i:i + CHUNK]))
                          for i in range(0, xy.shape[0], CHUNK)] or [xy.new_zeros(0, self.dim)])

    @torch.no_grad()
    def query(self, output_size: tuple[int, int] | None = None, *,
              size: tuple[int, int] | None = UNSET) -> torch.Tensor:
        """Features ``(1, C, H', W')`` on an ``(H', W') = output_size`` grid over the image
        (default: its size). ``size=`` is the deprecated name of ``output_size``."""
        output_size = renamed_keyword("size", "output_size", size, output_size)
        h, w = self.image_size if output_size is None else check_size(output_size, "output_size")
        xy = pixel_centres((h, w), self.image_size, self.image.device)
        out = self.image.new_empty(self.dim, h * w)
        for i in range(0, h * w, CHUNK):  # fill in place: no (N, C) concatenation copy
            out[:, i:i + CHUNK] = self.pca.decode(self.codes(xy[i:i + CHUNK])).T
        return out.view(1, self.dim, h, w)

    def forward(self, output_size: tuple[int, int] | None = None, *,
                size: tuple[int, int] | None = UNSET) -> torch.Tensor:
        """Same as :meth:`query`."""
        return self.query(renamed_keyword("size", "output_size", size, output_size))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``path`` (safetensors, atomically) and ``<stem>.json`` (config + fit metadata)."""
        meta = {"format": FORMAT, "version": VERSION, "mlp": self.mlp.config(),
                "image_size": list(self.image_size), "dim": self.dim, "pca_dim": self.pca.k,
                **{k: v for k, v in self.meta.items() if k not in ("format", "version")}}
        state = self.state_dict()
        if self.base is not None and torch.equal(self.base.half().to(self.base.dtype), self.base):
            state["base"] = self.base.half()  # exact at half the size (fit_implicit rounds it)
        return save_checkpoint(path, state, meta, sidecar=True)

    @classmethod
    def load(cls, path: str | os.PathLike[str],
             map_location: str | torch.device = "cpu") -> ImplicitFeatures:
        """Read a file written by :meth:`save`; queries give bit-identical results."""
        tensors, meta = load_checkpoint(path)
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not an implicit-features file (format "
                                  f"{meta.get('format')!r}, expected {FORMAT!r})")
        if meta.get("version", 0) > VERSION:
            raise CheckpointError(f"{path}: written by a newer upfeat (version {meta['version']})")
        try:
            mlp = ImplicitMLP(**meta["mlp"])
            pca = FeaturePCA(tensors["pca.mean"], tensors["pca.components"], tensors["pca.scale"])
            image = tensors["image"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: incomplete implicit-features file ({e})") from None
        extra = {k: v for k, v in meta.items() if k not in ("mlp", "image_size", "dim", "pca_dim")}
        out = cls(mlp, pca, image, extra, tensors.get("base"))
        load_module_state(out, tensors, "implicit features", path)
        return out.to(map_location).eval()
