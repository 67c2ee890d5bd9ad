r"""Spectral and sparse+low-rank pretraining: SST, SLTrain, ReLoRA.

    from lowrank import spectral
    spectral.to_sst(model, targets=r".*_proj", rank=16)
    tx = spectral.sst_adamw(1e-3, rank=spectral.sst_ranks(model))
    spectral.to_sltrain(model, targets=r".*_proj", rank=128, density=0.03)
    schedule = spectral.jagged_cosine_schedule(1e-3, total_steps=..., ...)

Modules: `sst` (Sparse Spectral Training), `sltrain` (sparse plus low-rank
layers), `relora` (LoRA merge-and-restart training loop).
"""

from lowrank.spectral import relora
from lowrank.spectral import sltrain
from lowrank.spectral import sst
from lowrank.spectral.relora import jagged_cosine_schedule
from lowrank.spectral.relora import merge_and_reinit
from lowrank.spectral.relora import prune_moments
from lowrank.spectral.relora import restart as relora_restart
from lowrank.spectral.relora import train as relora_train
from lowrank.spectral.relora import trainable as relora_trainable
from lowrank.spectral.sltrain import SLTrainLinear
from lowrank.spectral.sltrain import SparseIndex
from lowrank.spectral.sltrain import sparse_matmul
from lowrank.spectral.sltrain import to_sltrain
from lowrank.spectral.sst import ranks as sst_ranks
from lowrank.spectral.sst import resvd
from lowrank.spectral.sst import sample_indices
from lowrank.spectral.sst import sampling_probs
from lowrank.spectral.sst import sst_adamw
from lowrank.spectral.sst import sst_optimizer
from lowrank.spectral.sst import SSTLinear
from lowrank.spectral.sst import SSTState
from lowrank.spectral.sst import to_dense
from lowrank.spectral.sst import to_sst
from lowrank.spectral.sst import train_step
from lowrank.spectral import compress
from lowrank.spectral.compress import compress as lord_compress
from lowrank.spectral.compress import decompress
from lowrank.spectral.compress import eigen_compensate
from lowrank.spectral.compress import eora
from lowrank.spectral.compress import factorize
from lowrank.spectral.compress import LowRankFactor
from lowrank.spectral.compress import LowRankLinear
from lowrank.spectral.compress import welore_compress
from lowrank.spectral.compress import welore_ranks
from lowrank.spectral.compress import welore_trainable

# The public API: every name imported above, and every submodule (each is
# imported by the lines above, directly or through another submodule).
__all__ = sorted(n for n in dir() if not n.startswith("_"))
