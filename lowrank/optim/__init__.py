"""Memory-efficient optimizers as optax transformations.

Gradient low-rank projection (GaLore, Fira, FRUGAL, Q-GaLore), 8-bit Adam,
layer sampling (OwLore, LISA) and adapter-specific transforms (ALLoRA, the
SoRA proximal gate step).

    from lowrank import optim
    tx = optim.galore_adamw(1e-2, rank=128, refresh_every=200, scale=0.25)
"""

from lowrank.optim.adam8bit import adamw8bit
from lowrank.optim.adam8bit import BlockQuantized
from lowrank.optim.adam8bit import scale_by_adam8bit
from lowrank.optim.adam8bit import ScaleByAdam8bitState
from lowrank.optim.adam8bit import STATIC_ARGS as ADAM8BIT_STATIC_ARGS
from lowrank.optim.galore import fira_adamw
from lowrank.optim.galore import frugal_adamw
from lowrank.optim.galore import galore_adamw
from lowrank.optim.galore import GaLoreState
from lowrank.optim.galore import projected_leaves
from lowrank.optim.galore import q_galore_adamw
from lowrank.optim.galore import RefreshSchedule
from lowrank.optim.galore import scale_by_adam_per_matrix
from lowrank.optim.galore import scale_by_galore
from lowrank.optim.galore import ScaleByAdamPerMatrixState
from lowrank.optim.galore import STATIC_ARGS
from lowrank.optim.matrix_view import input_axes_from
from lowrank.optim.matrix_view import stacked_axes_from
from lowrank.optim.memory import compiled_memory
from lowrank.optim.memory import estimate_bytes
from lowrank.optim.memory import state_bytes
from lowrank.optim.memory import tree_bytes
from lowrank.optim.layer_sampling import default_layer_of
from lowrank.optim.layer_sampling import LayerSamplingState
from lowrank.optim.layer_sampling import lisa_adamw
from lowrank.optim.layer_sampling import LISA_STATIC_ARGS
from lowrank.optim.layer_sampling import outlier_ratios
from lowrank.optim.layer_sampling import OWLORE_STATIC_ARGS
from lowrank.optim.layer_sampling import owlore_adamw
from lowrank.optim.layer_sampling import sample_layers
from lowrank.optim.layer_sampling import scale_by_adam_per_slice
from lowrank.optim.layer_sampling import scale_by_layer_sampling
from lowrank.optim.layer_sampling import ScaleByAdamPerSliceState
from lowrank.optim.allora import allora_adamw
from lowrank.optim.allora import scale_by_allora
from lowrank.optim.allora import STATIC_ARGS as ALLORA_STATIC_ARGS
from lowrank.optim.sora import gate_mask
from lowrank.optim.sora import soft_threshold
from lowrank.optim.sora import sora_adamw
from lowrank.optim.sora import sora_proximal
from lowrank.optim.sora import SoRAProximalState
from lowrank.optim.sora import STATIC_ARGS as SORA_STATIC_ARGS

# The public API: every name imported above, and every submodule (each is
# imported by the lines above, directly or through another submodule).
__all__ = sorted(n for n in dir() if not n.startswith("_"))
