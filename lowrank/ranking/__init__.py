"""Ranking: learning-to-rank losses (and, later, rerankers)."""

from lowrank.ranking import losses

__all__ = ["losses"]
