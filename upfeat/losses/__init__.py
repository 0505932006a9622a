"""Training losses of FeatUp: Gaussian NLL with learned uncertainty, random projections,
smoothness priors, and :class:`MultiViewLoss` combining them for one jittered view."""
from .multiview import MultiViewLoss
from .nll import ScaleNet, gaussian_nll
from .projection import project, random_projection
from .regularizers import bilateral_smoothness, kernel_magnitude, tv_loss

__all__ = ["MultiViewLoss", "ScaleNet", "bilateral_smoothness", "gaussian_nll",
           "kernel_magnitude", "project", "random_projection", "tv_loss"]
