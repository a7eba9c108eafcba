"""A trained SASRec as a generative method's query encoder (``query_encoder: sasrec`` in URI and SEATER).

The URI paper leaves the encoders open ("in a sequential recommendation scenario, the query part can
use a sequential model as its encoder", section 4.2); SEATER's paper trains its own. With this option
the sequential model is a copy of the split's trained SASRec (the one every method builds on, cached
on disk): its hidden states are the decoder's cross-attention memory and its most recent state is the
query vector against the SASRec item table (tied, as SASRec trains them). A method fine-tunes the copy
with its own losses or keeps it frozen.

It has the encoder signature of ``encoder.onnx``: ``(history[B,T], history_mask[B,T]) ->
(memory[B,T,D], query[B,D])``.
"""

from __future__ import annotations

import copy

from torch import Tensor, nn

from training.bundle_recommender import sasrec_states
from training.methods.sasrec.model import SASRecModule


class SasrecQueryEncoder(nn.Module):
    """A trainable copy of a SASRec module as a method's query encoder.

    The states are :func:`~training.bundle_recommender.sasrec_states` (the convention SEATER's and
    TDR's exported SASRec query uses too); the query is their last column.
    """

    def __init__(self, sasrec: SASRecModule) -> None:
        super().__init__()
        self.sasrec = copy.deepcopy(sasrec)  # the baseline's own weights stay untouched

    @property
    def item_embedding(self) -> nn.Embedding:
        """The SASRec item table ``[N+1, D]``: history input and ranker item vectors."""
        return self.sasrec.item_emb

    @property
    def dim(self) -> int:
        return int(self.sasrec.item_emb.embedding_dim)

    def forward(self, history: Tensor, history_mask: Tensor) -> tuple[Tensor, Tensor]:
        hidden = sasrec_states(self.sasrec, history, history_mask)  # [B, T, D]
        return hidden, hidden[:, -1]  # memory [B, T, D], query [B, D]
