"""The paper's optimizers and the factory the training loop uses.

    from projbench.optim import SGDP, AdamP
"""

from projbench.optim.adamp import AdamP
from projbench.optim.factory import build_optimizer, param_groups
from projbench.optim.sgdp import SGDP

__all__ = ["AdamP", "SGDP", "build_optimizer", "param_groups"]
