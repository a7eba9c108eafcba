"""Batched constrained beam search against exhaustive search over random trees and scorers."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.index import TreeIndex
from models.search.beam import BeamResult, DeviceTrie, beam_finish, beam_start, beam_step
from models.search.staged import beam_search

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class TableScorer:
    """A deterministic random scorer: score(q, prefix, c) = A[q, c] + P[last(prefix), c] + 0.1 * depth."""

    def __init__(self, batch: int, num_nodes: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.query_table = torch.randn(batch, num_nodes, generator=gen)  # [B, n]
        self.pair_table = torch.randn(num_nodes, num_nodes, generator=gen)  # [n, n]
        self.calls = 0

    def __call__(self, beam_query: torch.Tensor, prefix: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        assert (prefix[:, 0] == 0).all(), "prefix must start at the root"
        safe = cand.clamp(min=0)  # [Bb, C]
        out = self.query_table[beam_query[:, None], safe] + self.pair_table[prefix[:, -1:], safe]
        return out + 0.1 * prefix.shape[1]

    def node_score(self, q: int, path: list[int], node: int) -> float:
        """Score of ``node`` whose ancestors (root first) are ``path``."""
        return float(
            self.query_table[q, node] + self.pair_table[path[-1], node] + torch.tensor(0.1) * len(path)
        )


def exhaustive(
    index: TreeIndex, scorer: TableScorer, q: int, mode: str, exclude: np.ndarray
) -> dict[int, float]:
    """Score of every reachable leaf (global id) for query ``q``."""
    out: dict[int, float] = {}

    def walk(node: int, path: list[int], total: float) -> None:
        children = index.children(node).tolist()
        if not children:
            out[node] = total
            return
        raw = np.array([scorer.node_score(q, [*path, node], c) for c in children], np.float64)
        logp = raw - (raw.max() + math.log(np.exp(raw - raw.max()).sum()))
        for c, r, lp in zip(children, raw, logp, strict=True):
            if exclude[c]:
                continue
            walk(c, [*path, node], total + lp if mode == "logprob" else r)

    walk(0, [], 0.0)
    return out


@st.composite
def trees(draw: st.DrawFn) -> TreeIndex:
    levels = draw(st.integers(1, 3))
    branching = draw(st.lists(st.integers(1, 4), min_size=levels, max_size=levels))
    n = draw(st.integers(1, 25))
    codes = np.zeros((n + 1, levels), np.int64)
    for level, k in enumerate(branching):
        codes[1:, level] = draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n))
    scheme = draw(st.sampled_from(["level", "node"]))
    return TreeIndex.from_codes(codes, branching, scheme)


def check_result(index: TreeIndex, result: BeamResult, beam: int, exclude: np.ndarray) -> None:
    parents = index.parents()
    leaves = result.leaves.numpy()
    paths = result.paths.numpy()
    scores = result.scores.numpy()
    assert leaves.shape[1] == beam and paths.shape[1:] == (beam, index.levels)
    for row in range(leaves.shape[0]):
        real = leaves[row] >= 0
        assert (real[:-1] >= real[1:]).all(), "padding must come last"
        assert np.isfinite(scores[row][real]).all() and np.isneginf(scores[row][~real]).all()
        assert (np.diff(scores[row][real]) <= 1e-6).all(), "scores sorted descending"
        assert len(set(leaves[row][real].tolist())) == real.sum(), "duplicate leaf"
        for leaf, path in zip(leaves[row][real], paths[row][real], strict=True):
            assert path[-1] == leaf and leaf >= index.leaf_start
            chain = [0, *path.tolist()]
            assert all(parents[c] == p for p, c in itertools.pairwise(chain)), "invalid path"
            assert not exclude[row][path].any(), "excluded node on a returned path"
        assert (paths[row][~real] == -1).all()


@SETTINGS
@given(index=trees(), mode=st.sampled_from(["logprob", "node"]), seed=st.integers(0, 10_000), data=st.data())
def test_wide_beam_equals_exhaustive(index: TreeIndex, mode: str, seed: int, data: st.DataObject) -> None:
    batch = 3
    extra = data.draw(st.integers(0, 3))
    beam = index.num_leaves + extra
    rng = np.random.default_rng(seed)
    exclude = rng.random((batch, index.num_nodes)) < data.draw(st.sampled_from([0.0, 0.15]))
    exclude[:, 0] = False
    scorer = TableScorer(batch, index.num_nodes, seed)
    trie = DeviceTrie.from_index(index)
    result = beam_search(trie, scorer, batch, beam, mode, exclude_nodes=torch.from_numpy(exclude))  # type: ignore[arg-type]
    assert scorer.calls == index.levels or not (~exclude).any()
    check_result(index, result, beam, exclude)
    for q in range(batch):
        expected = exhaustive(index, scorer, q, mode, exclude[q])
        got = {
            int(leaf): float(s)
            for leaf, s in zip(result.leaves[q], result.scores[q], strict=True)
            if leaf >= 0
        }
        assert set(got) == set(expected)
        for leaf, score in expected.items():
            assert got[leaf] == pytest.approx(score, abs=1e-4)


@SETTINGS
@given(
    index=trees(),
    mode=st.sampled_from(["logprob", "node"]),
    beam=st.integers(1, 6),
    seed=st.integers(0, 10_000),
    shared_exclude=st.booleans(),
)
def test_narrow_beam_paths_valid(
    index: TreeIndex, mode: str, beam: int, seed: int, shared_exclude: bool
) -> None:
    batch = 4
    rng = np.random.default_rng(seed)
    exclude = rng.random((1 if shared_exclude else batch, index.num_nodes)) < 0.2
    exclude[:, 0] = False
    scorer = TableScorer(batch, index.num_nodes, seed)
    mask = torch.from_numpy(exclude[0] if shared_exclude else exclude)
    result = beam_search(DeviceTrie.from_index(index), scorer, batch, beam, mode, exclude_nodes=mask)  # type: ignore[arg-type]
    check_result(index, result, beam, np.broadcast_to(exclude, (batch, index.num_nodes)))
    for q in range(batch):
        expected = exhaustive(index, scorer, q, mode, np.broadcast_to(exclude, (batch, index.num_nodes))[q])
        for leaf, score in zip(result.leaves[q].tolist(), result.scores[q].tolist(), strict=True):
            if leaf >= 0:
                assert score == pytest.approx(expected[leaf], abs=1e-4)


def test_greedy_follows_best_child_and_cuts_excluded_subtree() -> None:
    # root -> {1, 2}; 1 -> {3, 4}; 2 -> {5}
    codes = np.array([[-1, -1], [0, 0], [0, 1], [1, 0]])
    index = TreeIndex.from_codes(codes, 2, "node")
    prefer = torch.tensor([0.0, 5.0, 1.0, 0.0, 3.0, 2.0])  # node 1 over 2, leaf 4 over 3

    def scorer(beam_query: torch.Tensor, prefix: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        return prefer[cand.clamp(min=0)]

    trie = DeviceTrie.from_index(index)
    assert trie.children(torch.tensor([0, 1, 2, 3, -1])).tolist() == [
        [1, 2],
        [3, 4],
        [5, -1],
        [-1, -1],
        [-1, -1],
    ]
    greedy = beam_search(trie, scorer, 1, 1, "logprob")
    assert greedy.leaves.tolist() == [[4]] and greedy.paths.tolist() == [[[1, 4]]]
    exclude = torch.zeros(6, dtype=torch.bool)
    exclude[1] = True
    cut = beam_search(trie, scorer, 1, 3, "node", exclude_nodes=exclude)
    assert cut.leaves.tolist() == [[5, -1, -1]]
    assert cut.scores[0, 0] == 2.0 and torch.isneginf(cut.scores[0, 1:]).all()


def test_rejects_bad_arguments() -> None:
    index = TreeIndex.from_codes(np.array([[-1], [0], [1]]), 2, "level")
    trie = DeviceTrie.from_index(index)

    def scorer(q: torch.Tensor, p: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.zeros(c.shape[0], 1)

    with pytest.raises(ValueError, match="score_mode"):
        beam_search(trie, scorer, 1, 1, "sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="exclude_nodes"):
        beam_search(trie, scorer, 2, 1, "node", exclude_nodes=torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="scorer returned shape"):
        beam_search(trie, scorer, 1, 1, "node")


def test_matches_per_query_dict_trie_search() -> None:
    """Parity with the GENRE / HF-style baseline of ``genret bench search`` (independent code path)."""
    from benchmarks.search import DictTrie, genre_search, make_setup

    setup = make_setup(num_items=150, k=6, levels=3, batch=5, dim=16, seed=0)
    trie = DictTrie(setup.index, setup.models[0].vocab_id.numpy())
    with torch.inference_mode():
        for model in setup.models:
            ours = beam_search(setup.trie, model, 5, 7, "logprob")
            assert ours.leaves.tolist() == genre_search(model, 3, 5, trie, 7)


@SETTINGS
@given(
    index=trees(),
    mode=st.sampled_from(["logprob", "node"]),
    beam=st.integers(1, 6),
    seed=st.integers(0, 10_000),
)
def test_staged_search_interleaved_with_another_equals_one_shot(
    index: TreeIndex, mode: str, beam: int, seed: int
) -> None:
    """Two searches stepped level by level, alternately (as the shadow lane does between primary
    batches), give exactly the one-shot results: the stages keep no state outside ``BeamState``."""
    trie = DeviceTrie.from_index(index)
    rng = np.random.default_rng(seed)
    exclude = torch.from_numpy(rng.random((2, index.num_nodes)) < 0.2)
    exclude[:, 0] = False
    scorers = [TableScorer(2, index.num_nodes, seed), TableScorer(3, index.num_nodes, seed + 1)]
    oneshot = [
        beam_search(trie, scorers[0], 2, beam, mode, exclude_nodes=exclude),  # type: ignore[arg-type]
        beam_search(trie, scorers[1], 3, beam + 1, mode),  # type: ignore[arg-type]
    ]
    states = [
        beam_start(trie, 2, beam, mode, exclude_nodes=exclude),  # type: ignore[arg-type]
        beam_start(trie, 3, beam + 1, mode),  # type: ignore[arg-type]
    ]
    for level in range(index.levels):
        for i in (1, 0) if level % 2 else (0, 1):
            assert states[i].depth == level and not states[i].done(trie)
            states[i] = beam_step(trie, scorers[i], states[i])
    for state, expected in zip(states, oneshot, strict=True):
        assert state.done(trie)
        got = beam_finish(trie, state)
        assert torch.equal(got.leaves, expected.leaves)
        assert torch.equal(got.paths, expected.paths)
        assert torch.equal(got.scores, expected.scores)


def test_staged_search_refuses_steps_out_of_order() -> None:
    index = TreeIndex.from_codes(np.array([[-1, -1], [0, 0], [1, 1]]), 2, "level")
    trie = DeviceTrie.from_index(index)

    def scorer(q: torch.Tensor, p: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.zeros(c.shape)

    state = beam_start(trie, 1, 2, "logprob")
    with pytest.raises(ValueError, match="leaves are at 2"):
        beam_finish(trie, state)
    state = beam_step(trie, scorer, beam_step(trie, scorer, state))
    with pytest.raises(ValueError, match="already reached the leaves"):
        beam_step(trie, scorer, state)
    assert sorted(beam_finish(trie, state).leaves[0].tolist()) == sorted(
        range(index.leaf_start, index.num_nodes)
    )


class CachedTableScorer:
    """A :class:`StepScorer` scoring like :class:`TableScorer`. Its cache row of a position is that
    position's node id (W=1), so it can check what the search hands it: beams grouped by query and,
    for every beam, exactly the ids of its prefix positions ``0..S-2``."""

    cache_width = 1

    def __init__(self, table: TableScorer) -> None:
        self.table = table

    def step(
        self, beam_query: torch.Tensor, prefix: torch.Tensor, cand: torch.Tensor, cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B = int(beam_query.max()) + 1
        assert torch.equal(beam_query, torch.arange(B).repeat_interleave(prefix.shape[0] // B))
        assert cache.shape == (prefix.shape[0], prefix.shape[1] - 1, 1)
        assert torch.equal(cache[..., 0], prefix[:, :-1].float()), "a beam got another beam's cache"
        return self.table(beam_query, prefix, cand), prefix[:, -1:, None].float()  # [Bb, C], [Bb, 1, 1]


@SETTINGS
@given(
    index=trees(),
    mode=st.sampled_from(["logprob", "node"]),
    beam=st.integers(1, 6),
    seed=st.integers(0, 10_000),
)
def test_step_scorer_search_carries_each_beams_cache(
    index: TreeIndex, mode: str, beam: int, seed: int
) -> None:
    """With a :class:`StepScorer` the search hands every beam its parent's cache plus the parent's
    new row, and returns exactly what the same scorer gives as a plain (full-prefix) scorer."""
    trie = DeviceTrie.from_index(index)
    exclude = torch.from_numpy(np.random.default_rng(seed).random((3, index.num_nodes)) < 0.2)
    exclude[:, 0] = False
    table = TableScorer(3, index.num_nodes, seed)
    plain = beam_search(trie, table, 3, beam, mode, exclude_nodes=exclude)  # type: ignore[arg-type]
    cached = beam_search(trie, CachedTableScorer(table), 3, beam, mode, exclude_nodes=exclude)  # type: ignore[arg-type]
    assert torch.equal(cached.leaves, plain.leaves) and torch.equal(cached.paths, plain.paths)
    assert torch.equal(cached.scores, plain.scores)
