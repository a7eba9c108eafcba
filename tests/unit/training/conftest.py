"""Shared fixtures for the training tests: one small synthetic dataset and its split."""

from __future__ import annotations

import pytest

from training.data import SyntheticDataset, synthetic_dataset
from training.splits import Split, make_split


@pytest.fixture(scope="session")
def synthetic() -> SyntheticDataset:
    """1,000 users over 200 items in 4 x 4 planted clusters (fast to train on)."""
    return synthetic_dataset(num_users=1000, num_items=200, branching=4, depth=2, seed=0)


@pytest.fixture(scope="session")
def synthetic_split(synthetic: SyntheticDataset) -> Split:
    return make_split(synthetic, kind="user", seed=0, max_len=20)
