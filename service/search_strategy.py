"""How a batch of encoder states becomes top-k items: the generative search or the brute-force
baseline (``GENRET_SEARCH_MODE``), behind one interface the compute worker and the shadow executor
both use.

* :class:`GenerativeSearch`: constrained beam search over the bundle's trie, then the rerank of the
  beam's leaf items (:class:`models.retriever.Retriever`). Rows search together only with rows of
  the same beam width.
* :class:`BruteForceSearch`: exact inner-product top-K over the whole item table
  (:func:`models.bruteforce.bruteforce_topk`); the beam width does not matter.

Each also runs *staged* (:meth:`SearchStrategy.staged`): one stage per call, so the shadow
executor can give way to primary batches between stages; the staged result equals the one-shot one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from models.bruteforce import bruteforce_topk
from models.retriever import EncoderStates
from models.staged_search import StagedSearch
from service.models_registry import LoadedModel


@dataclass(frozen=True)
class Found:
    """The search's answer for a batch of rows."""

    items: np.ndarray  # [b, k] dense ids, 0 where fewer exist
    scores: np.ndarray  # [b, k] float32, -inf where padded
    candidates: list[int]  # [b] items the row's answer was chosen from (after exclusion)
    rerank_s: float = 0.0  # of the search's time, spent scoring the leaf items


class StagedRun(Protocol):
    """One row's search split into stages (:meth:`step` runs the next one)."""

    @property
    def done(self) -> bool: ...
    @property
    def next_stage(self) -> str: ...
    def step(self) -> object: ...
    def found(self) -> Found: ...


class SearchStrategy(Protocol):
    name: str

    def group_beam(self, beam_size: int) -> int:
        """Rows with the same (bundle, group_beam) are searched in one call."""
        ...

    def search(
        self, model: LoadedModel, states: EncoderStates, k: int, beam_size: int, exclude: Sequence[np.ndarray]
    ) -> Found: ...

    def staged(
        self, model: LoadedModel, states: EncoderStates, k: int, beam_size: int, exclude: Sequence[np.ndarray]
    ) -> StagedRun: ...


class GenerativeSearch:
    name = "generative"

    def group_beam(self, beam_size: int) -> int:
        return beam_size

    def search(
        self, model: LoadedModel, states: EncoderStates, k: int, beam_size: int, exclude: Sequence[np.ndarray]
    ) -> Found:
        leaves = model.retriever.beam(states, beam_size).leaves  # [b, beam]
        t_rerank = time.perf_counter()
        result = model.retriever.rerank(leaves, states.query, k, exclude)
        rerank_s = time.perf_counter() - t_rerank
        return Found(
            items=np.asarray(result.items),  # [b, k]
            scores=np.asarray(result.scores, dtype=np.float32),  # [b, k]
            candidates=[int(c) for c in np.asarray(result.num_candidates)],
            rerank_s=rerank_s,
        )

    def staged(
        self, model: LoadedModel, states: EncoderStates, k: int, beam_size: int, exclude: Sequence[np.ndarray]
    ) -> StagedRun:
        return _StagedGenerative(
            model.retriever.staged_search(states, k=k, beam_size=beam_size, exclude=exclude)
        )


class _StagedGenerative:
    """Each beam-search level, then the rerank (:class:`models.retriever.StagedSearch`)."""

    def __init__(self, search: StagedSearch) -> None:
        self._search = search

    @property
    def done(self) -> bool:
        return self._search.done

    @property
    def next_stage(self) -> str:
        return self._search.next_stage

    def step(self) -> object:
        return self._search.step()

    def found(self) -> Found:
        result = self._search.result()
        return Found(
            items=np.asarray(result.items),
            scores=np.asarray(result.scores, dtype=np.float32),
            candidates=[int(c) for c in np.asarray(result.num_candidates)],
        )


class BruteForceSearch:
    name = "bruteforce"

    def group_beam(self, beam_size: int) -> int:
        return 0  # the beam width plays no part

    def search(
        self, model: LoadedModel, states: EncoderStates, k: int, beam_size: int, exclude: Sequence[np.ndarray]
    ) -> Found:
        items, scores = bruteforce_topk(states.query, model.item_emb, k, list(exclude))  # [b, k]
        return Found(
            items=np.asarray(items),
            scores=np.asarray(scores, dtype=np.float32),
            candidates=[model.num_items - len(e) for e in exclude],
        )

    def staged(
        self, model: LoadedModel, states: EncoderStates, k: int, beam_size: int, exclude: Sequence[np.ndarray]
    ) -> StagedRun:
        return _OneStage(lambda: self.search(model, states, k, beam_size, exclude))


class _OneStage:
    """A search with a single stage, ``"bruteforce"``."""

    def __init__(self, run: Callable[[], Found]) -> None:
        self._run = run
        self._found: Found | None = None

    @property
    def done(self) -> bool:
        return self._found is not None

    @property
    def next_stage(self) -> str:
        return "bruteforce"

    def step(self) -> object:
        self._found = self._run()
        return self._found

    def found(self) -> Found:
        if self._found is None:
            raise RuntimeError("the brute-force stage has not run")
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
