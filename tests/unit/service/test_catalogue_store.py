"""The delta directory (service/catalogue/store.py): where it lives, atomic claims across processes,
damaged and foreign files."""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from models.catalogue.delta import Delta
from service.catalogue.store import DeltaStore, SequenceTaken, delta_dir, file_name


def test_the_directory_is_beside_the_bundle_or_under_the_setting(tmp_path: Path) -> None:
    bundle = tmp_path / "bundles" / "seater"
    assert delta_dir(bundle, None) == tmp_path / "bundles" / "seater.deltas"
    assert delta_dir(bundle, tmp_path / "shared") == tmp_path / "shared" / "seater.deltas"


def claim_many(directory: str, writer: int, count: int) -> list[int]:
    """Claim ``count`` files as one writer would: next number, retry when another took it."""
    store = DeltaStore(Path(directory))
    got = []
    for j in range(count):
        delta = Delta.from_json({"remove": [f"w{writer}-{j}"]})
        while True:
            seq = max(store.sequences(), default=0) + 1
            try:
                store.claim(seq, "fp", seq, delta)
            except SequenceTaken:
                continue
            got.append(seq)
            break
    return got


def test_concurrent_writers_in_several_processes_never_lose_or_share_a_number(tmp_path: Path) -> None:
    writers, each = 4, 15
    with ProcessPoolExecutor(writers) as pool:
        claimed = list(pool.map(claim_many, [str(tmp_path)] * writers, range(writers), [each] * writers))
    numbers = sorted(n for got in claimed for n in got)
    assert numbers == list(range(1, writers * each + 1))  # contiguous, no number twice
    store = DeltaStore(tmp_path)
    removed = [f.delta.remove[0] for f in store.pending(0) if f.delta is not None]
    assert sorted(removed) == sorted(f"w{w}-{j}" for w in range(writers) for j in range(each))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_damaged_and_hidden_files(tmp_path: Path) -> None:
    store = DeltaStore(tmp_path)
    store.claim(1, "fp", 1, Delta.from_json({"remove": ["a"]}))
    (tmp_path / file_name(2)).write_text("{not json")
    (tmp_path / file_name(3)).write_text(
        json.dumps({"base_fingerprint": "fp", "version": 2, "delta": {"add": 3}})
    )
    (tmp_path / ".000004.json.tmp").write_text("{}")  # a temporary in flight
    (tmp_path / "notes.txt").write_text("ignored")
    files = store.pending(0)
    assert [f.seq for f in files] == [1, 2, 3]
    assert files[0].delta is not None and files[0].base_fingerprint == "fp" and files[0].version == 1
    assert files[1].delta is None and "JSONDecodeError" in files[1].error
    assert files[2].delta is None and files[2].error.startswith("add:")
    assert [f.seq for f in store.pending(2)] == [3]
