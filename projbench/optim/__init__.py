"""The paper's optimizers and the factory the training loop uses.

    from projbench.optim import SGDP, AdamP, Projected   # Projected(params, inner=timm.optim.Lion, ...)
"""

from projbench.optim.adamp import AdamP
from projbench.optim.factory import build_optimizer, param_groups
from projbench.optim.sgdp import SGDP
from projbench.optim.wrapper import Projected

__all__ = ["AdamP", "Projected", "SGDP", "build_optimizer", "param_groups"]
