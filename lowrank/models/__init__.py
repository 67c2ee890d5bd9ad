"""Model definitions (Flax NNX) and their checkpoint loaders.

Submodules are imported explicitly, e.g. `from lowrank.models import bert`.
"""
