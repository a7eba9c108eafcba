"""ONNX Runtime (CPU provider) against the PyTorch modules, at the shapes serving produces.

Tolerance: ``atol=rtol=1e-4`` in float32. Both sides compute the same graph in float32, but ORT
fuses ops (attention, layer norm, GELU) and sums in a different order, which moves results by a
few ulps per op; through 2 encoder + 2 decoder layers of width 16 with O(1) activations the
observed error is ~1e-6, so 1e-4 leaves margin without hiding a wrong graph (a wrong mask or a
dropped layer changes outputs by O(0.1)).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.bundle.backend import BackendScorer, OnnxBackend, TorchBackend
from models.bundle.bundle import load_bundle
from models.index import TreeIndex
from models.search.beam import DeviceTrie
from models.search.staged import beam_search

from .conftest import DIM, MAX_HISTORY, NUM_ITEMS, TinyModel

ATOL = RTOL = 1e-4


@pytest.fixture(scope="module")
def backends(tiny_model: TinyModel, tiny_bundle_dir: Path) -> tuple[OnnxBackend, TorchBackend]:
    bundle = load_bundle(tiny_bundle_dir)
    return OnnxBackend.from_bundle(bundle, "cpu", intra_op_threads=1), TorchBackend(
        tiny_model.encoder, tiny_model.decoder
    )


def random_history(batch: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    history = torch.randint(1, NUM_ITEMS + 1, (batch, seq), generator=g)  # [B, T]
    lengths = torch.randint(0, seq + 1, (batch,), generator=g)
    lengths[0] = seq  # one full row
    mask = torch.arange(seq)[None, :] >= (seq - lengths)[:, None]  # left padding
    return history.masked_fill(~mask, 0), mask


@pytest.mark.parametrize("batch", [1, 3, 7])
@pytest.mark.parametrize("seq", [1, 5, MAX_HISTORY])
def test_encoder_parity(backends: tuple[OnnxBackend, TorchBackend], batch: int, seq: int) -> None:
    onnx_backend, torch_backend = backends
    history, mask = random_history(batch, seq, seed=batch * 100 + seq)
    ort_memory, ort_query = onnx_backend.encode(history, mask)
    ref_memory, ref_query = torch_backend.encode(history, mask)
    assert ort_memory.shape == (batch, seq, DIM) and ort_query.shape == (batch, DIM)
    torch.testing.assert_close(ort_memory, ref_memory, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ort_query, ref_query, atol=ATOL, rtol=RTOL)


def step_inputs(
    index: TreeIndex, batch: int, beams: int, prefix_len: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grouped beams (``beam_query[i] = i // beams``), a prefix of real nodes of levels ``0..S-1``,
    candidates = nodes of level ``S`` with padding (as the search passes them)."""
    g = torch.Generator().manual_seed(seed)
    Bb, lo = batch * beams, index.level_offsets
    beam_query = torch.arange(batch).repeat_interleave(beams)  # [Bb]
    prefix = torch.zeros(Bb, prefix_len, dtype=torch.int64)  # [Bb, S] root first
    for s in range(1, prefix_len):
        prefix[:, s] = torch.randint(int(lo[s]), int(lo[s + 1]), (Bb,), generator=g)
    C = index.max_branching
    candidates = torch.randint(int(lo[prefix_len]), int(lo[prefix_len + 1]), (Bb, C), generator=g)
    candidates[::2, C // 2 :] = -1  # padding in every other beam
    candidates[-1] = -1  # a fully padded beam
    return beam_query, prefix, candidates


@pytest.mark.parametrize("batch,beams_per_query", [(1, 1), (3, 2), (7, 5)])
@pytest.mark.parametrize("prefix_len", [1, 2])
def test_decoder_step_parity(
    backends: tuple[OnnxBackend, TorchBackend],
    tiny_model: TinyModel,
    batch: int,
    beams_per_query: int,
    prefix_len: int,
) -> None:
    """decoder_memory.onnx and decoder.onnx (the incremental step) against the torch step: the
    memory state, the scores and the new cache row."""
    onnx_backend, torch_backend = backends
    history, mask = random_history(batch, 5, seed=batch)
    memory, _ = torch_backend.encode(history, mask)
    beam_query, prefix, candidates = step_inputs(tiny_model.index, batch, beams_per_query, prefix_len, batch)
    cache = torch.randn(prefix.shape[0], prefix_len - 1, torch_backend.cache_width)  # [Bb, S-1, W]
    ort_state, ref_state = onnx_backend.prepare(memory), torch_backend.prepare(memory)
    assert [t.shape for t in ort_state] == [(batch, DIM, 5)] * 4  # 2 layers x (key, value)
    for got, ref in zip(ort_state, ref_state, strict=True):
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)
    ort_scores, ort_cache = onnx_backend.step(ort_state, mask, beam_query, prefix, candidates, cache)
    ref_scores, ref_cache = torch_backend.step(ref_state, mask, beam_query, prefix, candidates, cache)
    assert ort_scores.shape == candidates.shape and ort_cache.shape == (prefix.shape[0], 1, DIM * 4)
    torch.testing.assert_close(ort_scores, ref_scores, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ort_cache, ref_cache, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("prefix_len", [1, 2])
def test_onnx_step_chain_matches_the_torch_reference(
    backends: tuple[OnnxBackend, TorchBackend], tiny_model: TinyModel, prefix_len: int
) -> None:
    """New vs reference across backends: ORT steps replayed over the prefix (each position cached)
    against ``TokenDecoder.forward`` (the whole prefix at once, per-beam cross-attention)."""
    onnx_backend, torch_backend = backends
    history, mask = random_history(4, 5, seed=3)
    memory, _ = torch_backend.encode(history, mask)
    beam_query, prefix, candidates = step_inputs(tiny_model.index, 4, 3, prefix_len, seed=11)
    got = onnx_backend.score(memory, mask, beam_query, prefix, candidates)
    ref = torch_backend.score(memory, mask, beam_query, prefix, candidates)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


def test_decoder_parity_with_many_candidates(
    backends: tuple[OnnxBackend, TorchBackend], tiny_model: TinyModel
) -> None:
    """More candidates than the export example had (C is a dynamic axis too): every leaf at once."""
    onnx_backend, torch_backend = backends
    history, mask = random_history(3, 4, seed=7)
    memory, _ = torch_backend.encode(history, mask)
    lo = tiny_model.index.level_offsets
    beam_query, prefix, _ = step_inputs(tiny_model.index, 3, 2, 2, seed=5)
    nodes = np.concatenate([[-1], np.arange(int(lo[2]), int(lo[3]))])  # padding, then every level-2 node
    candidates = torch.from_numpy(np.tile(nodes, (6, 1)))  # [6, C] candidates of a 2-long prefix
    cache = torch.randn(6, 1, torch_backend.cache_width)
    args = (torch_backend.prepare(memory), mask, beam_query, prefix, candidates, cache)
    for got, ref in zip(onnx_backend.step(*args), torch_backend.step(*args), strict=True):
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("beam", [1, 3, 8])
def test_beam_search_with_the_step_equals_the_reference(
    backends: tuple[OnnxBackend, TorchBackend], tiny_model: TinyModel, beam: int
) -> None:
    """The served search (ORT step, cache carried by the search) returns the same leaves as the
    search over the reference decoder (full prefix every level), and path scores within ATOL."""
    onnx_backend, torch_backend = backends
    trie = DeviceTrie.from_index(tiny_model.index)
    history, mask = random_history(5, MAX_HISTORY, seed=beam)
    memory, _ = torch_backend.encode(history, mask)
    served = beam_search(trie, BackendScorer(onnx_backend, memory, mask), 5, beam, "logprob")
    reference = BackendScorer(torch_backend, memory, mask)
    ref = beam_search(trie, reference.__call__, 5, beam, "logprob")  # a plain Scorer: full prefix
    assert torch.equal(served.leaves, ref.leaves) and torch.equal(served.paths, ref.paths)
    finite = torch.isfinite(ref.scores)
    assert torch.equal(torch.isfinite(served.scores), finite)
    torch.testing.assert_close(served.scores[finite], ref.scores[finite], atol=ATOL, rtol=RTOL)


def test_onnx_backend_reports_its_provider(backends: tuple[OnnxBackend, TorchBackend]) -> None:
    onnx_backend, _ = backends
    assert onnx_backend.provider == "CPUExecutionProvider"
    assert "CPUExecutionProvider" in onnx_backend.device_info


def test_one_level_tree_exports_a_step_that_serves(tmp_path: Path) -> None:
    """A one-level tree only ever calls the step with the root as prefix (an empty cache): the graph
    must still be general (no shape specialised to 0) and agree with the reference search."""
    from models.nets.decoder import DecoderConfig, TokenDecoder
    from models.nets.encoder import EncoderConfig, QueryEncoder
    from training.export.writer import export_bundle

    codes = np.zeros((13, 1), np.int64)
    codes[1:, 0] = np.arange(12) % 4
    index = TreeIndex.from_codes(codes, 4, "level")
    torch.manual_seed(0)
    enc = QueryEncoder(EncoderConfig(num_items=12, dim=DIM, num_heads=2, max_len=4, dropout=0.0)).eval()
    dec = TokenDecoder(
        DecoderConfig(dim=DIM, num_heads=2, dropout=0.0), index.node_token, index.level_offsets
    )
    out = export_bundle(
        tmp_path / "one-level",
        name="one",
        method="test",
        encoder=enc,
        decoder=dec.eval(),
        index=index,
        item_emb=np.ones((13, DIM), np.float32),
        item_ids=[""] + [f"i{i}" for i in range(12)],
        popularity=np.ones(13, np.float32),
        score_mode="logprob",
        max_history=4,
        metrics={},
        config={},
        dataset_fingerprint="one-level",
        backends=("onnx",),
    )
    onnx_backend, torch_backend = OnnxBackend.from_bundle(load_bundle(out)), TorchBackend(enc, dec)
    history = torch.randint(1, 13, (3, 4), generator=torch.Generator().manual_seed(1))  # [B, T]
    mask = torch.ones(3, 4, dtype=torch.bool)
    memory, _ = torch_backend.encode(history, mask)
    trie = DeviceTrie.from_index(index)
    served = beam_search(trie, BackendScorer(onnx_backend, memory, mask), 3, 2, "logprob")
    ref = beam_search(trie, BackendScorer(torch_backend, memory, mask).__call__, 3, 2, "logprob")
    assert torch.equal(served.leaves, ref.leaves)
    torch.testing.assert_close(served.scores, ref.scores, atol=ATOL, rtol=RTOL)
