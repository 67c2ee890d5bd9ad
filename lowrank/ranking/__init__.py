"""Ranking: learning-to-rank losses, cross-encoder rerankers, `rerank`."""

from lowrank.ranking import cross_encoder
from lowrank.ranking import losses
from lowrank.ranking.cross_encoder import CrossEncoder
from lowrank.ranking.rerank import rerank

__all__ = ["CrossEncoder", "cross_encoder", "losses", "rerank"]
