"""Ranking: learning-to-rank losses, cross-encoder rerankers, `rerank`."""

from lowrank.ranking import cross_encoder
from lowrank.ranking import losses
from lowrank.ranking.cross_encoder import CrossEncoder
from lowrank.ranking.rerank import rerank

__all__ = ["CrossEncoder", "cross_encoder", "losses", "rerank"]
# Decoder rerankers (FIRST, ICR) and their prompt helpers.
# pylint: disable=g-import-not-at-top,wrong-import-position
from lowrank.ranking import decoder_text
from lowrank.ranking import first
from lowrank.ranking import icr
from lowrank.ranking.first import FirstReranker
from lowrank.ranking.icr import IcrReranker

__all__ += ["FirstReranker", "IcrReranker", "decoder_text", "first", "icr"]
