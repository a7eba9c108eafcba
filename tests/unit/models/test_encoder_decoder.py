"""QueryEncoder / TokenDecoder / NodeScorer: shapes, masking, padding invariance, token schemes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from models.index import TreeIndex
from models.nets.decoder import (
    PAD_SCORE,
    DecoderConfig,
    NodeScorer,
    TokenDecoder,
    node_levels,
    safe_key_padding,
    token_rows,
)
from models.nets.decoder_step import DecoderStep
from models.nets.encoder import EncoderConfig, QueryEncoder, recency_positions

D = 16


def encoder(**overrides: object) -> QueryEncoder:
    torch.manual_seed(0)
    cfg = EncoderConfig(num_items=20, dim=D, num_heads=2, max_len=8, dropout=0.0, **overrides)  # type: ignore[arg-type]
    return QueryEncoder(cfg).eval()


def small_index(token_scheme: str = "level") -> TreeIndex:
    codes = np.array([[0, 0], [0, 0], [0, 1], [1, 0], [1, 2], [2, 1]])  # 5 items, 2 levels
    return TreeIndex.from_codes(codes, 3, token_scheme)


def decoder(index: TreeIndex, **overrides: object) -> TokenDecoder:
    torch.manual_seed(0)
    cfg = DecoderConfig(dim=D, num_heads=2, dropout=0.0, token_scheme=index.token_scheme, **overrides)  # type: ignore[arg-type]
    return TokenDecoder(cfg, index.node_token, index.level_offsets).eval()


def test_recency_positions_count_from_the_newest_item() -> None:
    mask = torch.tensor([[False, True, True, True], [True, True, False, False]])
    assert recency_positions(mask).tolist() == [[0, 2, 1, 0], [1, 0, 0, 0]]


@torch.no_grad()
def test_encoder_shapes_and_query_projection() -> None:
    enc = encoder(query_dim=5)
    history = torch.randint(1, 21, (3, 7))
    memory, query = enc(history, torch.ones(3, 7, dtype=torch.bool))
    assert memory.shape == (3, 7, D) and query.shape == (3, 5)


@torch.no_grad()
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_left_padding_does_not_change_the_states(causal: bool, pooling: str) -> None:
    enc = encoder(causal=causal, pooling=pooling)
    items = torch.tensor([[3, 7, 1, 9]])
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.int64), items], dim=1)  # [1, 7]
    m1, q1 = enc(items, items > 0)
    m2, q2 = enc(padded, padded > 0)
    torch.testing.assert_close(q1, q2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m1, m2[:, 3:], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_causal_encoder_ignores_newer_items() -> None:
    history = torch.tensor([[0, 4, 5, 6]])
    changed = torch.tensor([[0, 4, 5, 11]])  # only the newest item differs
    for causal, same in ((True, True), (False, False)):
        enc = encoder(causal=causal)
        m1, _ = enc(history, history > 0)
        m2, _ = enc(changed, changed > 0)
        assert torch.allclose(m1[:, :3], m2[:, :3], atol=1e-6) is same


@torch.no_grad()
def test_empty_history_gives_finite_states_and_zero_last_query() -> None:
    enc = encoder()
    history = torch.zeros(2, 3, dtype=torch.int64)
    history[1, 2] = 4
    memory, query = enc(history, history > 0)
    assert torch.isfinite(memory).all() and torch.isfinite(query).all()
    assert torch.equal(query[0], torch.zeros(D))


@torch.no_grad()
def test_encoder_uses_an_injected_item_embedding() -> None:
    shared = nn.Embedding(21, D, padding_idx=0)
    enc = QueryEncoder(
        EncoderConfig(num_items=20, dim=D, num_heads=2, dropout=0.0), item_embedding=shared
    ).eval()
    assert enc.item_embedding is shared
    history = torch.tensor([[1, 2, 3]])
    before = enc(history, history > 0)[1]
    shared.weight.data[3] = torch.randn(D)
    assert not torch.allclose(before, enc(history, history > 0)[1])


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="divisible"):
        EncoderConfig(num_items=5, dim=10, num_heads=3)
    with pytest.raises(ValueError, match="token_scheme"):
        DecoderConfig(token_scheme="word")  # type: ignore[arg-type]


def test_token_rows_per_scheme() -> None:
    level, node = small_index("level"), small_index("node")
    assert node_levels(level.level_offsets).tolist() == [0, 1, 1, 1, 2, 2, 2, 2, 2]
    assert token_rows(node.node_token, node.level_offsets, "node").tolist() == list(range(node.num_nodes))
    rows = token_rows(level.node_token, level.level_offsets, "level")
    # same level-local token at different levels -> different rows; same token, same level -> same row
    assert len(set(rows.tolist())) == len(
        {(int(lv), int(t)) for lv, t in zip(node_levels(level.level_offsets), level.node_token, strict=True)}
    )


@torch.no_grad()
@pytest.mark.parametrize("scheme", ["level", "node"])
def test_decoder_scores_shape_and_padding(scheme: str) -> None:
    index = small_index(scheme)
    dec = decoder(index)
    memory, mask = torch.randn(2, 4, D), torch.tensor([[True] * 4, [False, False, True, True]])
    beam_query = torch.tensor([0, 1, 1])
    prefix = torch.tensor([[0, 1], [0, 2], [0, 3]])  # level-1 nodes -> candidates at level 2
    cands = torch.tensor([[4, 5, -1], [6, -1, -1], [7, 8, -1]])
    scores = dec(memory, mask, beam_query, prefix, cands)
    assert scores.shape == (3, 3)
    assert (scores[cands < 0] == PAD_SCORE).all() and (scores[cands >= 0] > PAD_SCORE / 2).all()
    h = dec.hidden(memory, mask, beam_query, prefix)
    assert h.shape == (3, D)
    torch.testing.assert_close(dec.score_hidden(h, cands), scores)


@torch.no_grad()
def test_decoder_reads_memory_of_its_beam_query_only() -> None:
    dec = decoder(small_index())
    memory, mask = torch.randn(2, 4, D), torch.ones(2, 4, dtype=torch.bool)
    prefix, cands = torch.tensor([[0]]), torch.tensor([[1, 2, 3]])
    first = dec(memory, mask, torch.tensor([0]), prefix, cands)
    memory[1] += 5.0  # another query's memory
    torch.testing.assert_close(dec(memory, mask, torch.tensor([0]), prefix, cands), first)
    assert not torch.allclose(dec(memory, mask, torch.tensor([1]), prefix, cands), first)


@torch.no_grad()
def test_decoder_with_empty_memory_mask_is_finite() -> None:
    dec = decoder(small_index())
    scores = dec(
        torch.randn(1, 3, D),
        torch.zeros(1, 3, dtype=torch.bool),
        torch.tensor([0]),
        torch.tensor([[0]]),
        torch.tensor([[1, 2, 3]]),
    )
    assert torch.isfinite(scores).all()


@torch.no_grad()
def test_injected_token_table_is_the_output_table() -> None:
    """SEATER ties leaf tokens to items: with an injected table, score = h · table[row] exactly."""
    index = small_index("node")
    table = nn.Embedding(index.num_nodes, D)
    cfg = DecoderConfig(dim=D, num_heads=2, dropout=0.0, token_scheme="node", use_bias=False)
    dec = TokenDecoder(cfg, index.node_token, index.level_offsets, token_embedding=table).eval()
    memory, mask = torch.randn(1, 2, D), torch.ones(1, 2, dtype=torch.bool)
    prefix, cands = torch.tensor([[0, 1]]), torch.tensor([[4, 5]])
    h = dec.hidden(memory, mask, torch.tensor([0]), prefix)
    torch.testing.assert_close(
        dec(memory, mask, torch.tensor([0]), prefix, cands), h @ table.weight[[4, 5]].T
    )


@torch.no_grad()
def test_node_scorer_ignores_the_prefix_and_pads() -> None:
    torch.manual_seed(0)
    scorer = NodeScorer(D, num_nodes=9).eval()
    memory, mask = torch.randn(2, 3, D), torch.ones(2, 3, dtype=torch.bool)
    cands = torch.tensor([[4, 5, -1], [1, 2, 3]])
    a = scorer(memory, mask, torch.tensor([0, 1]), torch.tensor([[0, 1], [0, 2]]), cands)
    b = scorer(memory, mask, torch.tensor([0, 1]), torch.tensor([[0, 3], [0, 1]]), cands)
    torch.testing.assert_close(a, b)
    assert a[0, 2] == PAD_SCORE


@torch.no_grad()
def test_hidden_equals_the_plain_transformer_decoder() -> None:
    """``hidden`` projects cross-attention keys once per query; trainers call ``decoder.layers``
    on ``memory[beam_query]`` directly, so both must agree (float32 reordering only)."""
    index = small_index()
    dec = decoder(index)
    memory = torch.randn(3, 5, D)
    mask = torch.tensor([[True] * 5, [False, False, False, True, True], [False] * 5])
    beam_query = torch.tensor([0, 1, 1, 2, 0])
    prefix = torch.tensor([[0, 1, 4], [0, 2, 6], [0, 3, 7], [0, 1, 5], [0, 2, 6]])
    causal = torch.ones(3, 3, dtype=torch.bool).triu(diagonal=1)
    x = dec.token_embedding(dec.node_row[prefix]) + dec.level_embedding(torch.arange(3))[None]
    out = dec.layers(
        x, memory[beam_query], tgt_mask=causal, memory_key_padding_mask=safe_key_padding(mask[beam_query])
    )
    torch.testing.assert_close(dec.hidden(memory, mask, beam_query, prefix), dec.output_norm(out[:, -1]))


# ------------------------------------------------------------------ the serving step (models/nets/decoder_step.py)
STEP_TOL = 1e-5
"""|step - reference| bound: the same float32 arithmetic in another order (keys/values cached,
attention batched per query, level scores by one product then a gather); observed ~2e-6 at D=16."""


def deep_index(token_scheme: str) -> TreeIndex:
    """3 levels, branching 3, 40 items spread over most leaves."""
    rng = np.random.default_rng(0)
    codes = np.zeros((41, 3), np.int64)
    codes[1:] = rng.integers(0, 3, size=(40, 3))
    return TreeIndex.from_codes(codes, 3, token_scheme)


def grouped_prefix(index: TreeIndex, B: int, w: int, S: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``beam_query[B*w]`` grouped by query and a root-first path ``[B*w, S]`` through the tree."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.zeros(B * w, S, dtype=torch.int64)
    for s in range(1, S):
        for row in range(B * w):
            children = index.children(int(prefix[row, s - 1]))
            prefix[row, s] = int(children[torch.randint(len(children), (1,), generator=g)])
    return torch.arange(B).repeat_interleave(w), prefix


def children_of(index: TreeIndex, nodes: torch.Tensor) -> torch.Tensor:
    """``[M, C]`` children of each node, -1 padded (the candidates the search passes)."""
    rows = [index.children(int(n)).tolist() for n in nodes]
    return torch.tensor([r + [-1] * (index.max_branching - len(r)) for r in rows])


@torch.no_grad()
@pytest.mark.parametrize("scheme", ["level", "node"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_step_fed_its_own_cache_equals_the_reference(scheme: str, use_bias: bool) -> None:
    """New vs reference: the step at every prefix length, fed the cache its earlier calls returned,
    scores like ``forward`` over the whole prefix (empty-history rows included)."""
    index = deep_index(scheme)
    dec = decoder(index, use_bias=use_bias)
    if dec.bias is not None:
        dec.bias.normal_()
    B, w = 3, 4
    memory = torch.randn(B, 5, D)
    mask = torch.tensor([[True] * 5, [False, False, True, True, True], [False] * 5])
    beam_query, prefix = grouped_prefix(index, B, w, index.levels, seed=1)
    cache = torch.zeros(B * w, 0, dec.cache_width)
    state = dec.memory_state(memory)  # once, for every level
    assert [t.shape for t in state] == [(B, D, 5)] * dec.state_count
    for S in range(1, index.levels + 1):
        cands = children_of(index, prefix[:, S - 1])  # [Bb, C] nodes of level S
        scores, out = dec.step(state, mask, beam_query, prefix[:, :S], cands, cache)
        torch.testing.assert_close(
            scores, dec(memory, mask, beam_query, prefix[:, :S], cands), atol=STEP_TOL, rtol=STEP_TOL
        )
        assert out.shape == (B * w, 1, dec.cache_width)
        cache = torch.cat([cache, out], dim=1)


@torch.no_grad()
def test_step_with_an_injected_token_table_equals_the_reference() -> None:
    """SEATER's tied leaves: node tokens read from an injected table, scored by a gather."""
    index = deep_index("node")
    table = nn.Embedding(index.num_nodes, D)
    cfg = DecoderConfig(dim=D, num_heads=2, dropout=0.0, token_scheme="node", use_bias=False)
    dec = TokenDecoder(cfg, index.node_token, index.level_offsets, token_embedding=table).eval()
    memory, mask = torch.randn(2, 4, D), torch.ones(2, 4, dtype=torch.bool)
    beam_query, prefix = grouped_prefix(index, 2, 3, 1, seed=2)
    candidates = children_of(index, prefix[:, 0])
    state = dec.memory_state(memory)
    scores, _ = dec.step(state, mask, beam_query, prefix, candidates, torch.zeros(6, 0, dec.cache_width))
    ref = dec(memory, mask, beam_query, prefix, candidates)
    torch.testing.assert_close(scores, ref, atol=STEP_TOL, rtol=STEP_TOL)


def test_step_refuses_a_cache_of_the_wrong_length() -> None:
    dec = decoder(small_index())
    memory, mask = torch.randn(1, 2, D), torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="S-1=1 positions"):
        dec.step(
            dec.memory_state(memory),
            mask,
            torch.tensor([0]),
            torch.tensor([[0, 1]]),
            torch.tensor([[4]]),
            torch.zeros(1, 0, 64),
        )


@torch.no_grad()
def test_decoder_step_wraps_a_stateless_scorer() -> None:
    """NodeScorer (TDR) has no step: the wrapper scores with forward and carries a width-0 cache."""
    torch.manual_seed(0)
    scorer = NodeScorer(D, num_nodes=9).eval()
    step = DecoderStep(scorer)
    memory, mask = torch.randn(2, 3, D), torch.ones(2, 3, dtype=torch.bool)
    beam_query, prefix, cands = (
        torch.tensor([0, 1]),
        torch.tensor([[0, 1], [0, 2]]),
        torch.tensor([[4, -1], [5, 6]]),
    )
    state = step.prepare(memory)  # the memory itself, as [B, D, T]
    assert step.state_count == 1 and [t.shape for t in state] == [(2, D, 3)]
    scores, out = step(mask, beam_query, prefix, cands, torch.zeros(2, 1, 0), *state)
    assert step.cache_width == 0 and out.shape == (2, 1, 0)
    torch.testing.assert_close(scores, scorer(memory, mask, beam_query, prefix, cands))
    assert DecoderStep(decoder(small_index())).cache_width == 2 * 2 * D  # layers x (key, value) x D
