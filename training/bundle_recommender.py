"""Recommending for evaluation the way the service does, shared by the SASRec-query methods.

:class:`SasrecQuery` wraps a trained SASRec as the ``query`` output of an exported encoder, and
:class:`BundleRecommender` answers ``recommend(histories, k, exclude)`` (the evaluator's interface)
through an exported bundle on ONNX Runtime, so the figures measured are those of what is served.
Used by ``training/seater.py`` and ``training/tdr.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import Tensor, nn

from models.bundle import load_bundle
from models.retriever import Retriever


def sasrec_states(sasrec: nn.Module, history: Tensor, history_mask: Tensor) -> Tensor:
    """SASRec hidden states of an encoder input: ``history[B,T], mask[B,T] -> [B,T,D]``.

    SASRec reads left-padded histories, so masked positions become padding; the last column is the
    most recent item (the user vector).
    """
    return sasrec(history * history_mask.to(history.dtype))  # [B, T, D]


class SasrecQuery(nn.Module):
    """The SASRec user vector as an encoder output: ``(history[B,T], mask[B,T]) -> [B, D]``.

    SASRec reads left-padded histories and takes its most recent position (the last column).
    """

    def __init__(self, sasrec_module: nn.Module) -> None:
        super().__init__()
        self.sasrec = sasrec_module

    def forward(self, history: Tensor, history_mask: Tensor) -> Tensor:
        return sasrec_states(self.sasrec, history, history_mask)[:, -1]  # [B, D]


class BundleRecommender:
    """Recommends through an exported bundle (ONNX Runtime): what is measured is what is served.

    Histories are retrieved ``batch_size`` at a time with a beam of :meth:`beam_for` ``(k)``:
    ``max(beam_size, k)``, since a leaf here holds one item (SEATER, TDR). Methods whose leaves are
    buckets override it (URI).
    """

    def __init__(
        self, bundle_dir: Path, beam_size: int, backend: str = "onnx", batch_size: int = 256
    ) -> None:
        self.retriever = Retriever(load_bundle(bundle_dir), backend=backend)
        self.beam_size = beam_size
        self.batch_size = batch_size

    def beam_for(self, k: int) -> int:
        """The beam width used to answer ``k`` items."""
        return max(self.beam_size, k)

    def recommend(self, histories: list[np.ndarray], k: int, exclude: list[np.ndarray] | None) -> np.ndarray:
        """Top-``k`` item ids per history, ``[N, k]``; ``exclude[i]`` are never returned for history i."""
        out = np.zeros((len(histories), k), np.int64)  # [N, k]
        for start in range(0, len(histories), self.batch_size):
            stop = start + self.batch_size
            chunk_exclude = exclude[start:stop] if exclude is not None else None
            result = self.retriever.retrieve(histories[start:stop], k, self.beam_for(k), chunk_exclude)
            out[start:stop] = result.items
        return out
