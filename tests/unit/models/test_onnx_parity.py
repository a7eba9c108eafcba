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

from models.backend import OnnxBackend, TorchBackend
from models.bundle import load_bundle

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


@pytest.mark.parametrize("batch,beams_per_query", [(1, 1), (3, 2), (7, 5)])
@pytest.mark.parametrize("prefix_len", [1, 2, 3])
def test_decoder_parity(
    backends: tuple[OnnxBackend, TorchBackend],
    tiny_model: TinyModel,
    batch: int,
    beams_per_query: int,
    prefix_len: int,
) -> None:
    onnx_backend, torch_backend = backends
    index = tiny_model.index
    history, mask = random_history(batch, 5, seed=batch)
    memory, _ = torch_backend.encode(history, mask)
    g = torch.Generator().manual_seed(batch * 10 + prefix_len)
    Bb = batch * beams_per_query
    beam_query = torch.arange(batch).repeat_interleave(beams_per_query)  # [Bb]
    prefix = torch.randint(0, index.num_nodes, (Bb, prefix_len), generator=g)  # [Bb, S]
    prefix[:, 0] = 0  # the root
    C = index.max_branching
    candidates = torch.randint(1, index.num_nodes, (Bb, C), generator=g)  # [Bb, C]
    candidates[::2, C // 2 :] = -1  # padding in every other beam
    candidates[-1] = -1  # a fully padded beam
    ort_scores = onnx_backend.score(memory, mask, beam_query, prefix, candidates)
    ref_scores = torch_backend.score(memory, mask, beam_query, prefix, candidates)
    assert ort_scores.shape == (Bb, C)
    torch.testing.assert_close(ort_scores, ref_scores, atol=ATOL, rtol=RTOL)


def test_decoder_parity_with_many_candidates(
    backends: tuple[OnnxBackend, TorchBackend], tiny_model: TinyModel
) -> None:
    """More candidates than the export example had (C is a dynamic axis too): every node at once."""
    onnx_backend, torch_backend = backends
    history, mask = random_history(2, 4, seed=7)
    memory, _ = torch_backend.encode(history, mask)
    nodes = np.arange(-1, tiny_model.index.num_nodes)
    candidates = torch.from_numpy(np.tile(nodes, (3, 1)))  # [3, num_nodes + 1]
    args = (memory, mask, torch.tensor([0, 1, 1]), torch.tensor([[0], [0], [0]]), candidates)
    torch.testing.assert_close(onnx_backend.score(*args), torch_backend.score(*args), atol=ATOL, rtol=RTOL)


def test_onnx_backend_reports_its_provider(backends: tuple[OnnxBackend, TorchBackend]) -> None:
    onnx_backend, _ = backends
    assert onnx_backend.provider == "CPUExecutionProvider"
    assert "CPUExecutionProvider" in onnx_backend.device_info
