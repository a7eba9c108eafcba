"""The delta directory (service/catalogue/store.py): where it lives, atomic claims across processes,
damaged and foreign files, and hostile records (service/catalogue/records.py): every one a fault
with its reason, none raising, none blocking, each quarantined once."""

from __future__ import annotations

import json
import logging
import os
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

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
    assert files[1].delta is None and files[1].reason == "bad_json"
    assert files[2].delta is None and files[2].reason == "bad_delta" and files[2].error.startswith("add:")
    assert [f.seq for f in store.pending(2)] == [3]


def record(delta: object, **envelope: object) -> str:
    return json.dumps({"base_fingerprint": "fp", "version": 1, "delta": delta, **envelope})


GOOD = {"remove": ["a"]}
HOSTILE: list[tuple[str, bytes, str]] = [  # (case, file bytes, reason)
    ("version 1e999", record(GOOD).replace('"version": 1', '"version": 1e999').encode(), "bad_record"),
    ("version a string", record(GOOD, version="7").encode(), "bad_record"),
    ("version negative", record(GOOD, version=-1).encode(), "bad_record"),
    ("version true", record(GOOD, version=True).encode(), "bad_record"),
    (
        "200,000 nested brackets",
        record(GOOD).replace('{"remove"', "[" * 200_000 + "]" * 200_000 + ',{"remove"').encode(),
        "bad_json",
    ),
    (
        "nested delta",
        ('{"base_fingerprint": "fp", "version": 1, "delta": ' + "[" * 200_000 + "]" * 200_000 + "}").encode(),
        "bad_json",
    ),
    ("invalid UTF-8", record(GOOD).encode().replace(b'"a"', b'"\xff\xfe"'), "not_utf8"),
    (
        "a 5000-digit version",
        record(GOOD).replace('"version": 1', '"version": ' + "9" * 5000).encode(),
        "bad_json",
    ),
    ("no fingerprint", json.dumps({"version": 1, "delta": GOOD}).encode(), "bad_record"),
    ("fingerprint a number", record(GOOD, base_fingerprint=5).encode(), "bad_record"),
    ("a list", b"[1, 2]", "bad_record"),
    ("empty", b"", "bad_json"),
    ("delta a string", record("remove a").encode(), "bad_delta"),
    ("remove ids objects", record({"remove": [{"id": "a"}]}).encode(), "bad_delta"),
    ("a lone surrogate id", record({"remove": ["\ud800"]}).encode(), "bad_delta"),
    ("a NUL in an id", record({"remove": ["a\u0000b"]}).encode(), "bad_delta"),
    ("vector of NaN", record({"add": [{"id": "n", "vector": [float("nan")]}]}).encode(), "bad_delta"),
    ("too many ids", record({"remove": [f"i{j}" for j in range(11)]}).encode(), "too_many_items"),
    ("too large", record({"remove": ["x" * 200] * 5}).encode() + b" " * 500_000, "too_large"),
]


@pytest.mark.parametrize("case,data,reason", HOSTILE, ids=[c for c, _, _ in HOSTILE])
def test_a_hostile_record_is_a_fault_with_its_reason(
    tmp_path: Path, case: str, data: bytes, reason: str
) -> None:
    store = DeltaStore(tmp_path, max_bytes=500_000, max_items=10)
    (tmp_path / file_name(1)).write_bytes(data)
    store.claim(2, "fp", 1, Delta.from_json(GOOD))
    first, second = store.pending(0)
    assert first.delta is None and first.reason == reason, (case, first.error)
    assert second.delta is not None  # the file behind it still reads


def test_only_regular_files_are_read_and_a_fifo_never_blocks(tmp_path: Path) -> None:
    store = DeltaStore(tmp_path)
    os.mkfifo(tmp_path / file_name(1))  # no writer: a blocking open would hang forever
    (tmp_path / file_name(2)).mkdir()
    (tmp_path / "target.json").write_text(record(GOOD))
    (tmp_path / file_name(3)).symlink_to(tmp_path / "target.json")
    store.claim(4, "fp", 1, Delta.from_json(GOOD))
    out: list[list[object]] = []
    reader = threading.Thread(target=lambda: out.append(list(store.pending(0))), daemon=True)
    reader.start()
    reader.join(timeout=30)
    assert not reader.is_alive(), "reading the delta directory blocked on a FIFO"
    files = out[0]
    assert [(f.seq, f.reason) for f in files[:3]] == [(s, "not_regular_file") for s in (1, 2, 3)]  # type: ignore[attr-defined]
    assert "named pipe" in files[0].error  # type: ignore[attr-defined]
    assert files[3].delta is not None  # type: ignore[attr-defined]


def test_a_quarantined_file_is_logged_once_and_never_read_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = DeltaStore(tmp_path)
    path = tmp_path / file_name(1)
    path.write_text(record(GOOD).replace('"version": 1', '"version": 1e999'))
    f = store.read(1)
    with caplog.at_level(logging.WARNING, logger="service.catalogue.store"):
        assert store.quarantine(f, f.reason, f.error)
        assert not store.quarantine(store.read(1), f.reason, f.error)
    assert [r.getMessage() for r in caplog.records if "quarantined" in r.getMessage()] == [
        f"catalogue delta {path} (version unknown) quarantined: bad_record: {f.error}"
    ]
    path.write_text(record(GOOD))  # rewritten in place: this process has set the number aside
    assert store.read(1).delta is None and store.read(1).reason == "bad_record"
    assert DeltaStore(tmp_path).read(1).delta is not None  # a new process (restart) reads it again
    assert store.lag(0) == 1 and store.lag(1) == 0
