r"""Low-rank adapters: pure math, NNX layers, injection, merge, file I/O.

    from lowrank import adapters
    adapters.inject(model, targets=r".*\.(query|value)", rank=8, alpha=16)
    optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.LoRAParam)
    ...
    adapters.save_adapters("out/any", model)   # any method, lowrank format
    adapters.save_adapters("out/hf", model, format="peft")  # HF PEFT files
    adapters.load_adapters("out/hf", fresh_model, format="peft")
    adapters.merge(model)                      # fold into the base weights

`inject(method=...)` picks the adapter family; `adapters.METHODS` lists the
registered ones and `adapters.INITIALIZERS` the data/SVD initialisations.
"""

from lowrank.adapters.injection import adapter_modules
from lowrank.adapters.injection import count_parameters
from lowrank.adapters.injection import disabled
from lowrank.adapters.injection import inject
from lowrank.adapters.injection import merge
from lowrank.adapters.injection import unload
from lowrank.adapters.injection import unmerge
from lowrank.adapters.layers import AdapterState
from lowrank.adapters.layers import Basis
from lowrank.adapters.layers import INITIALIZERS
from lowrank.adapters.layers import LoRAEinsum
from lowrank.adapters.layers import LoRAEmbed
from lowrank.adapters.layers import LoRALinear
from lowrank.adapters.layers import LoRALinearGeneral
from lowrank.adapters.layers import LoRAWrapper
from lowrank.adapters.layers import METHODS
from lowrank.adapters.layers import register
from lowrank.adapters.layers import register_init
from lowrank.adapters.adapter_io import FORMATS
from lowrank.adapters.adapter_io import load_adapters
from lowrank.adapters.adapter_io import save_adapters
# Deprecated aliases (warn, then call save_adapters / load_adapters).
from lowrank.adapters.adapter_io import load_adapter
from lowrank.adapters.adapter_io import load_peft
from lowrank.adapters.adapter_io import save_adapter
from lowrank.adapters.adapter_io import save_peft
# Importing a variant module registers its methods / inits.
from lowrank.adapters import dora  # dora
from lowrank.adapters import lora_xs  # lora_xs, loldu; init lora_sb
from lowrank.adapters import merging
from lowrank.adapters import multi  # multi_lora
from lowrank.adapters import quantized  # init lq_lora; quantize_base=
from lowrank.adapters import random_basis  # vera, nola, randlora
from lowrank.adapters import rank_control  # dylora, adalora, sora, increlora
from lowrank.adapters import svd_init  # inits pissa, olora, corda
from lowrank.adapters.dora import DoRA
from lowrank.adapters.lora_xs import first_gradients
from lowrank.adapters.lora_xs import LoLDU
from lowrank.adapters.lora_xs import LoRAXS
from lowrank.adapters.merging import lora_factors
from lowrank.adapters.merging import merge_dare
from lowrank.adapters.merging import merge_lego
from lowrank.adapters.merging import merge_linear
from lowrank.adapters.merging import merge_ties
from lowrank.adapters.merging import set_lora_factors
from lowrank.adapters.multi import add_adapter
from lowrank.adapters.multi import adapter_ids
from lowrank.adapters.multi import adapter_names
from lowrank.adapters.multi import delete_adapter
from lowrank.adapters.multi import from_lora
from lowrank.adapters.multi import set_active
from lowrank.adapters.svd_init import collect_input_covariance
from lowrank.adapters.rank_control import active_ranks
from lowrank.adapters.rank_control import adalora_budget
from lowrank.adapters.rank_control import adalora_orth_regularizer
from lowrank.adapters.rank_control import apply_budget
from lowrank.adapters.rank_control import export_pruned
from lowrank.adapters.rank_control import grow_ranks
from lowrank.adapters.rank_control import ImportanceState
from lowrank.adapters.rank_control import init_importance
from lowrank.adapters.rank_control import prune
from lowrank.adapters.rank_control import sample_rank
from lowrank.adapters.rank_control import set_rank
from lowrank.adapters.rank_control import update_importance
from lowrank.adapters.quantized import inject_quantized
from lowrank.adapters.quantized import merge_quantized
from lowrank.adapters.quantized import quantize_base
from lowrank.adapters.quantized import unmerge_quantized
from lowrank.adapters.random_basis import NOLAWrapper
from lowrank.adapters.random_basis import RandLoRAWrapper
from lowrank.adapters.random_basis import share_bases
from lowrank.adapters.random_basis import VeRAWrapper

# The public API: every name imported above, and every submodule (each is
# imported by the lines above, directly or through another submodule).
__all__ = sorted(n for n in dir() if not n.startswith("_"))
