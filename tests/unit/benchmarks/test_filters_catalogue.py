"""``genret bench filters`` on a tiny bundle, and the phase split of ``genret bench catalogue``."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.catalogue import Record, phase
from benchmarks.filters import KINDS, FilterConfig, allow_lists, measure, random_histories
from models.bundle.bundle import load_bundle
from models.search.retriever import Retriever


@pytest.fixture(scope="module")
def retriever(tmp_path_factory: pytest.TempPathFactory) -> Retriever:
    from benchmarks.synthetic_bundle import make_synthetic_bundle

    out = tmp_path_factory.mktemp("filters") / "b"
    path = make_synthetic_bundle(out, 2000, 8, 3, dim=16, seed=0, num_layers=1, backends=("torch",))
    return Retriever(load_bundle(path), "cpu", "torch")


def test_allow_lists_have_the_size_asked(retriever: Retriever) -> None:
    rng = np.random.default_rng(0)
    for kind in KINDS[1:]:
        for a in allow_lists(kind, 5, 40, retriever, rng):
            assert a is not None and len(np.unique(a)) == 40 and a.min() >= 1 and a.max() <= 2000


def test_every_row_gets_k_allowed_items(retriever: Retriever) -> None:
    cfg = FilterConfig(k=10, requests=12, batch=4, share=0.02)
    histories = random_histories(retriever, cfg.requests, 0)
    for kind in KINDS:
        row = measure(kind, retriever, histories, cfg)
        assert row.full_k == 1.0 and row.all_allowed and 0.0 <= row.overlap <= 1.0
        assert row.allowed == (0 if kind == "none" else 40)


def test_phases_split_the_records() -> None:
    records = [
        Record(0.0, 0.1, True),
        Record(1.0, 1.5, True),
        Record(1.9, 2.2, False),
        Record(3.0, 3.1, True),
    ]
    without = phase(records, 0.0, 2.0, overlap=False)
    during = phase(records, 2.0, 2.5, overlap=True)
    assert (without.requests, without.failed) == (2, 0)
    assert (during.requests, during.failed) == (1, 1) and np.isnan(during.p99_ms)
