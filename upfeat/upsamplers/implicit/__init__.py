"""FeatUp's implicit upsampler: one small network per image, queried at any resolution.

``fit_implicit(image, backbone)`` fits an MLP on Fourier features of ``(x, y, r, g, b)`` (learned
phase) so that every jittered view of its output, downsampled, reproduces the backbone's features
of that view (multi-view loss with a learned uncertainty, attention downsampler, TV prior), in a
per-image PCA space. The ``fast`` schedule fits the network as a correction to the shipped JBU's
output (``base``); ``reference`` fits the network alone, as the authors. The result,
:class:`ImplicitFeatures`, answers ``query((H, W))`` -> ``(1, C, H, W)`` and ``query_points(xy)``
-> ``(N, C)``, and saves to safetensors + JSON.

Modules: :mod:`.encoding` (Fourier features, MLP, coordinates), :mod:`.features` (PCA, the fitted
field, save/load), :mod:`.schedules` (``fast`` and ``reference``), :mod:`.fit` (the optimisation).

Example:
    >>> import torch
    >>> f = fit_implicit(torch.rand(3, 224, 224), "vits14_focus")  # doctest: +SKIP
    >>> f.query((448, 448)).shape                                    # doctest: +SKIP
    torch.Size([1, 384, 448, 448])
"""
from .encoding import FourierEncoding, ImplicitMLP
from .features import FeaturePCA, ImplicitFeatures
from .fit import fit_implicit
from .schedules import FAST, REFERENCE, SCHEDULES, Schedule, get_schedule

__all__ = ["FAST", "REFERENCE", "SCHEDULES", "FeaturePCA", "FourierEncoding", "ImplicitFeatures",
           "ImplicitMLP", "Schedule", "fit_implicit", "get_schedule"]
