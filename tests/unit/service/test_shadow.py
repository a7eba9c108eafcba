"""Shadow lane: agreement measures (hand values, a direct re-implementation of the RBO formula,
properties), the lane (never awaited by the primary, never changes its answer, yields to a busy
primary, drops and counts under overload, times out), the rotating JSONL log, and the log's round
trip through ``genret replay`` / ``genret ab-report`` (``cli.main.main``)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cli.main import main as genret
from service.metrics import REGISTRY
from service.shadow.agreement import Agreement, Ranked, ShadowJob, jaccard, overlap_at_k, rank_biased_overlap
from service.shadow.lane import ShadowConfig, ShadowLane
from service.shadow.log import ShadowLog, log_files, read_records

# ---- agreement measures -------------------------------------------------------------------------


def rbo_by_definition(a: list[str], b: list[str], p: float) -> float:
    """RBO_ext straight from Webber et al. (2010) eq. 32, with X_d recomputed from sets at every depth."""
    short, long_ = (a, b) if len(a) <= len(b) else (b, a)
    s, ll = len(short), len(long_)

    def x(d: int) -> int:
        return len(set(short[: min(d, s)]) & set(long_[:d]))

    head = sum(x(d) / d * p**d for d in range(1, ll + 1))
    tail = sum(x(s) * (d - s) / (s * d) * p**d for d in range(s + 1, ll + 1))
    return (1 - p) / p * (head + tail) + ((x(ll) - x(s)) / ll + x(s) / s) * p**ll


def test_agreement_hand_values() -> None:
    assert overlap_at_k(["a", "b", "c", "d"], ["d", "c", "x", "y"], 4) == 0.5
    assert overlap_at_k(["a", "b", "c"], ["c", "b", "a"], 2) == 0.5  # only the top 2 of each count
    assert overlap_at_k(["a"], ["a"], 10) == 1.0  # k' = min(k, longer list)
    assert overlap_at_k([], [], 5) == 1.0
    assert jaccard(["a", "b", "c"], ["b", "c", "d"]) == 0.5
    assert rank_biased_overlap(["a", "b"], ["b", "a"]) == pytest.approx(0.9)  # (.1/.9)(.81) + .81
    assert rank_biased_overlap(["a", "b", "c"], ["a", "b", "c"]) == pytest.approx(1.0)
    assert rank_biased_overlap(["a"], ["a", "b"]) == pytest.approx(1.0)  # extrapolates the agreeing prefix
    assert rank_biased_overlap(["a", "b"], ["c", "d"]) == 0.0
    assert rank_biased_overlap([], ["a"]) == 0.0
    # a swap at the top costs more than the same swap at the bottom (top-weighted)
    top = rank_biased_overlap(list("abcdef"), list("bacdef"))
    bottom = rank_biased_overlap(list("abcdef"), list("abcdfe"))
    assert top < bottom < 1.0


rankings = st.lists(st.sampled_from([f"i{n}" for n in range(12)]), max_size=10, unique=True)


@settings(max_examples=150, deadline=None)
@given(a=rankings, b=rankings, p=st.sampled_from([0.5, 0.8, 0.9, 0.98]))
def test_rbo_matches_the_formula_and_is_a_similarity(a: list[str], b: list[str], p: float) -> None:
    rbo = rank_biased_overlap(a, b, p)
    assert 0.0 <= rbo <= 1.0
    assert rbo == pytest.approx(rank_biased_overlap(b, a, p))
    if a and b:
        assert rbo == pytest.approx(rbo_by_definition(a, b, p), abs=1e-12)
    if a:
        assert rank_biased_overlap(a, a, p) == pytest.approx(1.0)
    if not set(a) & set(b) and (a or b):
        assert rbo == 0.0
    k = max(len(a), len(b), 1)
    assert 0.0 <= overlap_at_k(a, b, k) <= 1.0 and 0.0 <= jaccard(a, b) <= 1.0


# ---- the lane ------------------------------------------------------------------------------------


def job(
    i: int, items: tuple[str, ...] = ("a", "b", "c"), bundle: str = "shadow-b", variant: str = "control"
) -> ShadowJob[dict[str, object]]:
    return ShadowJob(
        request={"user_id": f"u{i}", "history": [f"h{i}"], "k": len(items)},
        primary=Ranked(items=items, bundle="primary-a", version="va", latency_s=0.001 * (i + 1)),
        shadow_bundle=bundle,
        variant=variant,
        experiment="exp",
        request_id=str(i),
        user_hash=f"hash{i}",
        k=len(items),
    )


def dropped(reason: str) -> float:
    return REGISTRY.get_sample_value("genret_shadow_dropped_total", {"reason": reason}) or 0.0


def test_primary_never_waits_for_nor_changes_with_a_shadow(tmp_path: Path) -> None:
    """The primary answers 20 requests while every shadow run is blocked; answers equal the no-lane run."""

    def primary(request: dict[str, object]) -> list[str]:
        return [f"{request['user_id']}-{n}" for n in range(3)]

    release = asyncio.Event()

    async def nasty_shadow(request: dict[str, object]) -> Ranked:
        await release.wait()
        request["history"] = ["mutated"]  # the copy it was given; the primary already answered
        if request["user_id"] == "u3":
            raise RuntimeError("shadow bundle exploded")
        return Ranked(items=("zzz",), bundle="shadow-b", version="vb", latency_s=float("nan"))

    async def serve(lane: ShadowLane[dict[str, object]] | None) -> list[list[str]]:
        answers = []
        for i in range(20):
            request: dict[str, object] = {"user_id": f"u{i}", "history": [f"h{i}"]}
            answer = primary(request)
            if lane is not None:
                copy = dict(request)
                lane.offer(
                    ShadowJob(
                        copy, Ranked(tuple(answer), "a", "va", 0.001), "shadow-b", "v", "e", str(i), "h", 3
                    )
                )
            answers.append(answer)
        return answers

    async def scenario() -> tuple[list[list[str]], list[list[str]], ShadowLane[dict[str, object]]]:
        baseline = await serve(None)
        lane: ShadowLane[dict[str, object]] = ShadowLane(
            nasty_shadow, ShadowConfig(queue_size=32, max_age_s=60), ShadowLog(tmp_path / "s.jsonl")
        )
        lane.start()
        with_lane = await serve(lane)  # completes while every shadow is blocked on `release`
        assert lane.stats["ok"] == 0
        release.set()
        await lane.join()
        await lane.stop()
        assert lane.shadow_log is not None
        lane.shadow_log.close()
        return baseline, with_lane, lane

    baseline, with_lane, lane = asyncio.run(scenario())
    assert with_lane == baseline
    assert lane.stats["ok"] == 19 and lane.stats["error"] == 1
    records = list(read_records(tmp_path / "s.jsonl"))
    assert [r["primary"]["items"] for r in records] == baseline
    assert next(r for r in records if r["request_id"] == "3")["shadow"]["error"].startswith("RuntimeError")


def test_lane_drops_and_counts_under_overload() -> None:
    busy = True

    async def shadow(request: dict[str, object]) -> Ranked:
        return Ranked(items=("a",), bundle="shadow-b", version="vb", latency_s=0.002)

    async def scenario() -> ShadowLane[dict[str, object]]:
        nonlocal busy
        lane: ShadowLane[dict[str, object]] = ShadowLane(
            shadow, ShadowConfig(queue_size=3, max_age_s=60), primary_idle=lambda: not busy
        )
        lane.start()
        accepted = [lane.offer(job(i)) for i in range(10)]
        await asyncio.sleep(0.02)  # the worker holds one copy, waiting for the primary to go idle
        assert lane.stats["ok"] == 0, "ran while the primary was busy"
        assert accepted[:3] == [True] * 3 and accepted[3:] == [False] * 7
        busy = False
        await lane.join()
        await lane.stop()
        return lane

    before = dropped("queue_full")
    lane = asyncio.run(scenario())
    assert lane.stats["dropped_queue_full"] == 7 and lane.stats["ok"] == 3
    assert dropped("queue_full") == before + 7


def test_stale_copies_timeouts_and_offers_after_stop_are_counted() -> None:
    async def slow_shadow(request: dict[str, object]) -> Ranked:
        await asyncio.sleep(10)
        raise AssertionError("not reached")

    async def scenario() -> ShadowLane[dict[str, object]]:
        never_idle: ShadowLane[dict[str, object]] = ShadowLane(
            slow_shadow, ShadowConfig(max_age_s=0.02), primary_idle=lambda: False
        )
        never_idle.start()
        never_idle.offer(job(0))
        await never_idle.join()
        await never_idle.stop()
        assert never_idle.stats["dropped_stale"] == 1
        assert never_idle.offer(job(1)) is False and never_idle.stats["dropped_shutdown"] == 1

        timing_out: ShadowLane[dict[str, object]] = ShadowLane(slow_shadow, ShadowConfig(timeout_s=0.02))
        timing_out.start()
        timing_out.offer(job(2))
        await timing_out.join()
        await timing_out.stop()
        return timing_out

    before = dropped("stale")
    lane = asyncio.run(scenario())
    assert lane.stats["timeout"] == 1
    assert dropped("stale") == before + 1


def test_log_rotates_and_reads_back_in_order(tmp_path: Path) -> None:
    log = ShadowLog(tmp_path / "shadow.jsonl", max_bytes=2048, backups=50)
    for i in range(60):
        log.write({"i": i, "primary": {}, "shadow": {}, "pad": "x" * 100})
    log.close()
    assert len(log_files(tmp_path / "shadow.jsonl")) > 2
    assert [r["i"] for r in read_records(tmp_path / "shadow.jsonl", include_rotated=True)] == list(range(60))
    (tmp_path / "bad.jsonl").write_text('{"primary": {}, "shadow": {}}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not JSON"):
        list(read_records(tmp_path / "bad.jsonl"))


# ---- round trip through the CLI --------------------------------------------------------------------


def test_shadow_log_round_trips_through_genret_replay_and_ab_report(tmp_path: Path) -> None:
    """Records written by a real lane are summarised by `genret replay --log` with the same numbers."""
    shadow_items = {"shadow-b": ("a", "x", "b"), "shadow-c": ("c", "b", "a")}

    async def shadow(request: dict[str, object]) -> Ranked:
        bundle = str(request["bundle"])
        if request["user_id"] == "u5":
            raise RuntimeError("boom")
        return Ranked(items=shadow_items[bundle], bundle=bundle, version="vs", latency_s=0.003)

    jobs = []
    for i in range(12):
        bundle = "shadow-b" if i % 2 else "shadow-c"
        j = job(i, bundle=bundle, variant="control" if i < 6 else "treatment")
        jobs.append(
            ShadowJob({**j.request, "bundle": bundle}, j.primary, bundle, j.variant, "exp", str(i), "h", 3)
        )

    async def scenario() -> None:
        lane: ShadowLane[dict[str, object]] = ShadowLane(
            shadow, ShadowConfig(), ShadowLog(tmp_path / "shadow.jsonl")
        )
        lane.start()
        for j in jobs:
            assert lane.offer(j)
        await lane.join()
        await lane.stop()
        assert lane.shadow_log is not None
        lane.shadow_log.close()

    asyncio.run(scenario())
    out = tmp_path / "summary.json"
    assert genret(["replay", "--log", str(tmp_path / "shadow.jsonl"), "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["records"] == 12
    groups = {(g["variant"], g["shadow"]): g for g in summary["groups"]}
    assert set(groups) == {
        ("control", "shadow-b"),
        ("control", "shadow-c"),
        ("treatment", "shadow-b"),
        ("treatment", "shadow-c"),
        ("(all)", "(all)"),
    }
    expected_b = Agreement.of(("a", "b", "c"), shadow_items["shadow-b"], 3)
    control_b = groups[("control", "shadow-b")]  # jobs 1, 3, 5 (5 failed)
    assert control_b["requests"] == 3 and control_b["errors"] == 1
    assert control_b["overlap"] == pytest.approx(expected_b.overlap_at_k)
    assert control_b["rbo"] == pytest.approx(expected_b.rbo)
    assert control_b["primary_p50_ms"] == pytest.approx(3.0)  # jobs 1 and 3: 2 ms and 4 ms
    assert control_b["shadow_p50_ms"] == pytest.approx(3.0)
    assert groups[("(all)", "(all)")]["requests"] == 12 and groups[("(all)", "(all)")]["errors"] == 1
    assert groups[("treatment", "shadow-c")]["jaccard"] == pytest.approx(1.0)

    png = tmp_path / "ab.png"
    assert genret(["ab-report", "--log", str(tmp_path / "shadow.jsonl"), "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
