"""Gradient low-rank projection (GaLore family) as optax transformations.

    from lowrank import optim
    tx = optim.galore_adamw(1e-2, rank=128, update_gap=200, scale=0.25)
"""

from lowrank.optim.galore import default_mask
from lowrank.optim.galore import fira_adamw
from lowrank.optim.galore import frugal_adamw
from lowrank.optim.galore import galore_adamw
from lowrank.optim.galore import GaLoreState
from lowrank.optim.galore import q_galore_adamw
from lowrank.optim.galore import RefreshSchedule
from lowrank.optim.galore import scale_by_galore
from lowrank.optim.galore import STATIC_ARGS
from lowrank.optim.memory import estimate_bytes
from lowrank.optim.memory import state_bytes
from lowrank.optim.memory import tree_bytes
