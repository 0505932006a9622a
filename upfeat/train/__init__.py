"""Multi-view training (FeatUp) on Lightning Fabric: config, data, objective, loop, checkpoints."""
from .config import TrainConfig
from .engine import fit
from .objective import MultiViewObjective

__all__ = ["MultiViewObjective", "TrainConfig", "fit"]
