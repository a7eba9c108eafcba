from __future__ import annotations

import numpy as np
import pytest

from training.data import Dataset, ItemVocab
from training.splits import make_split, training_pairs


def _dataset(lengths: list[int]) -> Dataset:
    rng = np.random.default_rng(1)
    num_items = 30
    seqs = [rng.integers(1, num_items + 1, size=n).astype(np.int64) for n in lengths]
    return Dataset(
        name="t",
        user_ids=[f"u{i}" for i in range(len(lengths))],
        sequences=seqs,
        vocab=ItemVocab(["", *(str(i) for i in range(1, num_items + 1))]),
    )


def test_user_split_puts_each_user_in_exactly_one_part(synthetic) -> None:
    split = make_split(synthetic, "user", seed=3)
    valid, test = set(split.valid.user_ids), set(split.test.user_ids)
    assert not valid & test
    assert len(split.train) + len(valid) + len(test) == synthetic.num_users
    assert len(valid) == len(test) == synthetic.num_users // 10
    by_user = dict(zip(synthetic.user_ids, synthetic.sequences, strict=True))
    eval_seqs = {id(by_user[u]) for u in valid | test}
    assert not any(id(seq) in eval_seqs for seq in split.train)


def test_user_split_history_is_the_first_80_percent_and_targets_the_rest(synthetic) -> None:
    split = make_split(synthetic, "user", seed=0, max_len=50)
    by_user = dict(zip(synthetic.user_ids, synthetic.sequences, strict=True))
    for user, history, targets in zip(
        split.test.user_ids, split.test.histories, split.test.targets, strict=True
    ):
        seq = by_user[user]
        cut = len(seq) * 4 // 5
        assert np.array_equal(history, seq[:cut])  # strictly before the targets in time
        assert set(targets.tolist()) == set(seq[cut:].tolist())
        assert len(np.unique(targets)) == len(targets) >= 1


def test_user_split_caps_history_and_keeps_one_target_for_short_users() -> None:
    ds = _dataset([2, 3, 100] * 10)
    split = make_split(ds, "user", seed=0, max_len=5)
    for ev in (split.valid, split.test):
        assert all(1 <= len(h) <= 5 for h in ev.histories)
        assert all(len(t) >= 1 for t in ev.targets)
    long_users = [
        i for i, u in enumerate(split.test.user_ids) if len(ds.sequences[ds.user_ids.index(u)]) == 100
    ]
    for i in long_users:
        seq = ds.sequences[ds.user_ids.index(split.test.user_ids[i])]
        assert np.array_equal(split.test.histories[i], seq[75:80])  # the 5 most recent of the first 80


def test_user_split_depends_on_the_seed_only(synthetic) -> None:
    a, b, c = (make_split(synthetic, "user", seed=s) for s in (0, 0, 1))
    assert a.test.user_ids == b.test.user_ids != c.test.user_ids


def test_leave_one_out() -> None:
    ds = _dataset([2, 5, 8])
    split = make_split(ds, "loo", max_len=3)
    assert split.test.user_ids == ["u1", "u2"]  # u0 has too few items to hold two out
    seq = ds.sequences[2]
    assert np.array_equal(split.test.histories[1], seq[4:7]) and split.test.targets[1].tolist() == [seq[7]]
    assert np.array_equal(split.valid.histories[1], seq[3:6]) and split.valid.targets[1].tolist() == [seq[6]]
    assert np.array_equal(split.train[2], seq[:6])


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown split kind 'time'"):
        make_split(_dataset([3]), "time")


def test_training_pairs_left_pad_and_cap() -> None:
    histories, targets = training_pairs([np.array([5, 6, 7, 8]), np.array([9])], max_len=2)
    assert targets.tolist() == [6, 7, 8]
    assert histories.tolist() == [[0, 5], [5, 6], [6, 7]]
    empty_h, empty_t = training_pairs([np.array([1])], max_len=3)
    assert empty_h.shape == (0, 3) and empty_t.shape == (0,)
