"""``genret bench search``'s decoder-step section: the FLOP formula, the limit's GEMM list, a small run."""

from __future__ import annotations

import argparse

import pytest
import torch

from benchmarks.search import make_setup
from benchmarks.step import StepShape, level_shapes, run_step_bench, step_gemms


@pytest.mark.parametrize(
    "shape",
    [
        StepShape(level=1, B=64, w=1, S=1, T=50, D=64, layers=2, heads=2, F=256, C=64, V=64),
        StepShape(level=3, B=5, w=7, S=3, T=9, D=16, layers=3, heads=4, F=32, C=6, V=6),
    ],
)
def test_the_limit_times_exactly_the_products_the_formula_counts(shape: StepShape) -> None:
    """The printed FLOP count and the GEMM shapes the limit is timed on describe the same work."""
    gemm_flops = sum(2 * n * batch * M * K * N for n, batch, M, K, N in step_gemms(shape))
    assert gemm_flops == shape.flops()
    assert shape.reference_flops() > shape.flops() or shape.S == 1


def test_level_shapes_follow_the_beam() -> None:
    setup = make_setup(num_items=200, k=6, levels=3, batch=4, dim=16, seed=0, memory_len=5)
    decoder = setup.models[0].decoder  # type: ignore[union-attr]
    shapes = level_shapes(decoder, B=4, beam=10, T=5, C=6, levels=3)
    assert [(s.w, s.S, s.Bb) for s in shapes] == [(1, 1, 4), (6, 2, 24), (10, 3, 40)]


def test_small_run_reports_every_level_and_the_same_leaves() -> None:
    torch.set_num_threads(1)
    setup = make_setup(num_items=200, k=6, levels=3, batch=4, dim=16, seed=0, memory_len=5)
    args = argparse.Namespace(beam=5, repeats=1, gemm_repeats=1, onnx=False, profile=False)
    report = run_step_bench(setup.models[0], setup.trie, args)
    assert report["same_leaves"] is True and [lv["level"] for lv in report["levels"]] == [1, 2, 3]
    assert all(lv["limit_ms"] > 0 and lv["new_ms"] > 0 and lv["old_ms"] > 0 for lv in report["levels"])
