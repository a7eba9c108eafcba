"""URI's query encoder when it starts from the SASRec baseline (``URIConfig.query_encoder: sasrec``).

The URI paper leaves the encoders open ("in a sequential recommendation scenario, the query part can
use a sequential model as its encoder", section 4.2). :class:`SasrecQueryEncoder` is that sequential
model: a copy of the split's trained SASRec (the one SEATER and TDR build on, cached on disk), whose
hidden states are the decoder's cross-attention memory and whose most recent state is the ranker's
query vector, against the SASRec item table (tied, as SASRec trains them). URI then fine-tunes it
with its own losses (E-step, ranker) at ``lr * encoder_lr_scale``, or keeps it frozen at scale 0.

It has the encoder signature of ``encoder.onnx``: ``(history[B,T], history_mask[B,T]) ->
(memory[B,T,D], query[B,D])``.
"""

from __future__ import annotations

import copy

from torch import Tensor, nn

from training.sasrec import SASRecModule


class SasrecQueryEncoder(nn.Module):
    """A trainable copy of a SASRec module as URI's query encoder.

    SASRec reads left-padded histories and its last position is the most recent item, so masked
    positions are turned into padding and the query is the last column of the hidden states.
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
        items = history * history_mask.to(history.dtype)  # [B, T] masked positions -> padding
        hidden = self.sasrec(items)  # [B, T, D]
        return hidden, hidden[:, -1]  # memory [B, T, D], query [B, D]
