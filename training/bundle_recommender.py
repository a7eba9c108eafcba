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

from models.bundle.bundle import load_bundle
from models.search.retriever import Retriever
from training.bundle_evaluation import beam_groups


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

    ``beam_size`` ``None`` (or 0) = the bundle's own default (manifest ``config.beam_size``). Each
    history is answered at :meth:`Retriever.beam_for` ``(k, beam_size, excluded)``, the widening the
    service applies (a beam whose leaves hold ``k`` items besides the excluded ones), so offline
    figures are the service's. ``scored`` / ``queries`` count the items scored (before exclusion)
    and the histories answered, for :attr:`mean_candidates`.
    """

    def __init__(
        self, bundle_dir: Path, beam_size: int | None = None, backend: str = "onnx", batch_size: int = 256
    ) -> None:
        self.retriever = Retriever(load_bundle(bundle_dir), backend=backend)
        self.beam_size = beam_size or self.retriever.default_beam_size
        self.batch_size = batch_size
        self.scored = 0
        self.queries = 0

    @property
    def mean_candidates(self) -> float:
        """Mean items scored per history answered so far (counted before history exclusion)."""
        return self.scored / max(1, self.queries)

    def beam_for(self, k: int, num_excluded: int = 0) -> int:
        """The beam width used to answer ``k`` items with ``num_excluded`` ids excluded."""
        return self.retriever.beam_for(k, self.beam_size, num_excluded)

    def recommend(self, histories: list[np.ndarray], k: int, exclude: list[np.ndarray] | None) -> np.ndarray:
        """Top-``k`` item ids per history, ``[N, k]``; ``exclude[i]`` are never returned for history i."""
        out = np.zeros((len(histories), k), np.int64)  # [N, k]
        excluded = [len(np.unique(e)) for e in exclude] if exclude is not None else [0] * len(histories)
        groups = beam_groups(self.retriever, k, self.beam_size, excluded)
        for beam, rows in groups.items():
            for start in range(0, len(rows), self.batch_size):
                idx = rows[start : start + self.batch_size]
                chunk_exclude = [exclude[i] for i in idx] if exclude is not None else None
                result = self.retriever.retrieve([histories[i] for i in idx], k, beam, chunk_exclude)
                out[idx] = result.items
                self.scored += int(result.num_scored.sum())
                self.queries += len(idx)
        return out
