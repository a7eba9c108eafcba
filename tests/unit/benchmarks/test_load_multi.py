"""Open-loop load from several generator processes (benchmarks/load_multi.py) against the trivial
server of the generator's ceiling: together they offer exactly the target, every request answered,
latencies merged from every process."""

from __future__ import annotations

import pytest

from benchmarks.load import http_post, start_trivial_server
from benchmarks.load_multi import multi_open_loop


@pytest.mark.parametrize("processes", [1, 2])
def test_generators_together_offer_the_target_rate(processes: int) -> None:
    proc, port = start_trivial_server()
    try:
        body = http_post("/v1/retrieve", b'{"history":["1"]}')
        stats = multi_open_loop("127.0.0.1", port, [body, body], 150.0, 1.0, processes)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert stats.processes == processes and stats.target_qps == 150.0
    assert stats.sent == 150 and stats.errors == 0 and stats.valid
    assert 0 < stats.p50_ms <= stats.p99_ms
