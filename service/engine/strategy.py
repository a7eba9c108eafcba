"""How a batch of encoder states becomes top-k items: the generative search or the brute-force
baseline (``GENRET_SEARCH_MODE``), behind one interface the compute worker and the shadow executor
both use.

* :class:`GenerativeSearch`: constrained beam search over the bundle's trie (exclusions and
  allow-lists cut its branches), then the rerank of the beam's leaf items
  (:class:`models.search.retriever.Retriever`); a row left with fewer than k items is filled by exact
  search over what it may return (``RetrievalResult.dense_filled``). Rows search together only with rows of the
  same beam width. Where the retriever holds CUDA graphs (torch backend on ``cuda``) a batch with
  no allow-list runs as one ``"graph"`` stage: the captured static-shape search from its encoder
  states, then the fill (:meth:`models.search.graph_runner.GraphRunner.search`); a batch a graph
  cannot serve (a new shape past the cap, too many exclusions, a failed capture) runs eagerly.
* :class:`BruteForceSearch`: exact inner-product top-K over the live items
  (:func:`models.search.bruteforce.bruteforce_topk`; a row with an allow-list over its allowed items);
  the beam width does not matter.

``allow``: per row, the dense ids it may return, or None (any live item). Removed items are never
returned by either.

Both answer in the models' own :class:`~models.search.retrieval_types.RetrievalResult` and run as
stages (:meth:`SearchStrategy.staged`, one stage per :meth:`StagedRun.step`): the compute worker
runs every stage at once, the shadow executor gives way to primary batches between two.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch

from models.search.bruteforce import bruteforce_topk
from models.search.constraints import fill_rows
from models.search.retrieval_types import EncoderStates, RetrievalResult
from service.registry.model_registry import LoadedModel

Allow = Sequence[np.ndarray | None] | None  # per row: dense ids it may return, or None (any)
Fill = bool | Sequence[int]  # the dense fill: off, on to k, or each row's own target


class StagedRun(Protocol):
    """A batch's search split into stages (:meth:`step` runs the next one and returns its name)."""

    @property
    def done(self) -> bool: ...
    @property
    def next_stage(self) -> str: ...
    def step(self) -> str: ...
    def result(self) -> RetrievalResult: ...


class SearchStrategy(Protocol):
    name: str

    def group_beam(self, beam_size: int) -> int:
        """Rows with the same (bundle, group_beam) are searched in one call."""
        ...

    def staged(
        self,
        model: LoadedModel,
        states: EncoderStates,
        k: int,
        beam_size: int,
        exclude: Sequence[np.ndarray],
        allow: Allow = None,
        fill: Fill = False,
    ) -> StagedRun: ...


class GenerativeSearch:
    name = "generative"

    def group_beam(self, beam_size: int) -> int:
        return beam_size

    def staged(
        self,
        model: LoadedModel,
        states: EncoderStates,
        k: int,
        beam_size: int,
        exclude: Sequence[np.ndarray],
        allow: Allow = None,
        fill: Fill = False,
    ) -> StagedRun:
        """One ``"graph"`` stage where a CUDA graph may serve the batch (module docstring), else the
        retriever's own stages (:meth:`models.search.retriever.Retriever.staged_search`): each
        beam-search level, then ``"rerank"``."""
        retriever = model.retriever
        graphs = retriever.graphs
        if allow is None and graphs is not None and graphs.serves(states.batch_size, beam_size):

            def graphed() -> RetrievalResult:
                found = graphs.search(states, k, beam_size, exclude, fill)
                if found is None:  # this shape cannot be captured or replayed: eagerly
                    return retriever.search(states, k, beam_size, exclude, fill=fill)
                return found

            return _OneStage(graphed, "graph")
        return retriever.staged_search(
            states, k=k, beam_size=beam_size, exclude=exclude, allow=allow, fill=fill
        )


class BruteForceSearch:
    name = "bruteforce"

    def group_beam(self, beam_size: int) -> int:
        return 0  # the beam width plays no part

    def search(
        self,
        model: LoadedModel,
        states: EncoderStates,
        k: int,
        beam_size: int,
        exclude: Sequence[np.ndarray],
        allow: Allow = None,
    ) -> RetrievalResult:
        removed = model.removed
        blocked = (
            [np.concatenate([np.asarray(e, np.int64), removed]) for e in exclude] if len(removed) else exclude
        )
        items, scores = bruteforce_topk(states.query, model.item_emb, k, list(blocked))  # [b, k]
        items, scores = np.array(items), np.array(scores, dtype=np.float32)
        candidates = [model.num_live - len(e) for e in exclude]
        if allow is not None:  # an allow-list row: the exact top-k over its allowed items instead
            lookup = model.retriever.lookup
            listed = [a is not None for a in allow]
            items[listed], scores[listed] = 0, -np.inf
            query = states.query.to(model.item_emb.device, torch.float32)  # [b, Dr]
            targets = [k if on else 0 for on in listed]
            fill_rows(
                lookup,
                model.item_emb,
                items,
                scores,
                np.zeros(len(items), np.int64),
                targets,
                query,
                exclude,
                allow,
            )
            for r, a in enumerate(allow):
                if a is not None:
                    candidates[r] = len(lookup.allowed_items(a, exclude[r]))
        counts = np.asarray(candidates, np.int64)  # [b]
        return RetrievalResult(
            items=items,
            scores=scores,
            num_candidates=counts,
            leaves=np.zeros((len(items), 0), np.int64),  # no beam
            num_scored=counts,
        )

    def staged(
        self,
        model: LoadedModel,
        states: EncoderStates,
        k: int,
        beam_size: int,
        exclude: Sequence[np.ndarray],
        allow: Allow = None,
        fill: Fill = False,
    ) -> StagedRun:
        """One stage, ``"bruteforce"`` (exact: ``fill`` has nothing to add)."""
        return _OneStage(lambda: self.search(model, states, k, beam_size, exclude, allow), "bruteforce")


class _OneStage:
    """A search with a single stage (``"bruteforce"``, or ``"graph"``: a captured search)."""

    def __init__(self, run: Callable[[], RetrievalResult], name: str) -> None:
        self._run = run
        self._name = name
        self._found: RetrievalResult | None = None

    @property
    def done(self) -> bool:
        return self._found is not None

    @property
    def next_stage(self) -> str:
        return self._name

    def step(self) -> str:
        self._found = self._run()
        return self._name

    def result(self) -> RetrievalResult:
        if self._found is None:
            raise RuntimeError(f"the {self._name} stage has not run")
        return self._found


STRATEGIES: dict[str, type[GenerativeSearch] | type[BruteForceSearch]] = {
    "generative": GenerativeSearch,
    "bruteforce": BruteForceSearch,
}


def strategy_for(search_mode: str) -> SearchStrategy:
    """The strategy of ``GENRET_SEARCH_MODE`` (``generative`` or ``bruteforce``)."""
    try:
        return STRATEGIES[search_mode]()
    except KeyError:
        raise ValueError(f"unknown search mode {search_mode!r}; known: {sorted(STRATEGIES)}") from None
