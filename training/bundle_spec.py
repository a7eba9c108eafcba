"""The one bundle spec every method exports through (:func:`training.export.write_bundle`), and
:func:`method_bundle`, which fills in what every trained method shares (items, popularity, data)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from models.index import TreeIndex
from training.trainer import popularity_counts

if TYPE_CHECKING:
    from training.registry import TrainContext


@dataclass(frozen=True)
class BundleSpec:
    """Everything a bundle holds besides where it goes: the one argument of :func:`write_bundle`.

    ``encoder``: any module ``(history[B,T], mask[B,T]) -> (memory[B,T,D], query[B,Dr])``;
    ``decoder``: any module with the decoder-step signature. ``item_emb`` [N+1, Dr] must use the
    same Dr as the encoder's ``query``. ``version`` defaults to the UTC creation time.
    ``backends``: None = ONNX, plus the torch files (safetensors + module specs) when the modules
    are kinds :mod:`models.torch_bundle` rebuilds; or an explicit subset of ``("onnx", "torch")``.
    """

    name: str
    method: str
    encoder: nn.Module
    decoder: nn.Module
    index: TreeIndex
    item_emb: np.ndarray
    item_ids: Sequence[str] | np.ndarray
    popularity: np.ndarray
    score_mode: str
    max_history: int
    metrics: dict[str, Any]
    config: dict[str, Any]
    dataset_fingerprint: str
    version: str | None = None
    backends: Sequence[str] | None = None


def method_bundle(
    ctx: TrainContext,
    *,
    method: str,
    encoder: nn.Module,
    decoder: nn.Module,
    index: TreeIndex,
    item_emb: np.ndarray,
    score_mode: str,
    config: dict[str, Any],
    max_history: int | None = None,
    metrics: dict[str, Any] | None = None,
    name: str | None = None,
) -> BundleSpec:
    """The spec of a method trained in ``ctx``: item ids, training popularity, the data set's
    fingerprint and (unless given) the split's history length come from ``ctx``."""
    return BundleSpec(
        name=name or method,
        method=method,
        encoder=encoder,
        decoder=decoder,
        index=index,
        item_emb=item_emb,
        item_ids=list(ctx.dataset.vocab.raw_ids),
        popularity=popularity_counts(ctx.split.train, index.num_items),
        score_mode=score_mode,
        max_history=ctx.split.max_len if max_history is None else max_history,
        metrics=dict(metrics or {}),
        config=config,
        dataset_fingerprint=ctx.dataset.fingerprint(),
    )
