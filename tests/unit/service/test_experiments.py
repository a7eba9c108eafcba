"""Experiment config and assignment: validation, stickiness, weights (chi-square), shadow sampling,
reload on change, and the hooks the engine calls (with the service's real request/response models)."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from pydantic import ValidationError

from service.engine.results import ModelIdentity, Retrieval
from service.metrics import REGISTRY
from service.schemas import RetrieveRequest
from service.settings import Settings
from service.shadow.agreement import Ranked
from service.shadow.experiments import (
    ExperimentConfig,
    ExperimentConfigError,
    ExperimentFile,
    ExperimentHooks,
    ExperimentRouter,
    ShadowTarget,
    Variant,
    ranked_from_result,
    router_from_settings,
    unit_hash,
    user_key,
)
from service.shadow.lane import ShadowConfig
from service.shadow.log import ShadowLog, read_records

ROOT = Path(__file__).resolve().parents[3]

# chi-square critical values at alpha = 0.001 (tables): a correct hash fails this with
# probability 1/1000 for a random key set; the keys here are fixed, so the test is deterministic.
CHI2_CRIT_001 = {1: 10.828, 2: 13.816, 3: 16.266}


def chi_square(observed: list[int], expected: list[float]) -> float:
    return sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True))


CONFIG: dict[str, Any] = {
    "name": "exp-1",
    "salt": "s1",
    "variants": [
        {"name": "a", "bundle": "bundle-a", "weight": 5},
        {"name": "b", "bundle": "bundle-b", "weight": 3},
        {"name": "c", "bundle": "bundle-c", "weight": 2},
    ],
    "shadows": [{"bundle": "bundle-s", "sample_rate": 0.1}],
}


def write_config(path: Path, data: Mapping[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# ---- config -------------------------------------------------------------------------------------


def test_load_parses_variants_and_shadows(tmp_path: Path) -> None:
    config = ExperimentConfig.load(write_config(tmp_path / "exp.yaml", CONFIG))
    assert config.name == "exp-1" and config.salt == "s1"
    assert config.variants[1] == Variant("b", "bundle-b", 3.0)
    assert config.shadows == (ShadowTarget("bundle-s", 0.1),)
    assert config.bundles == ["bundle-a", "bundle-b", "bundle-c", "bundle-s"]


def test_variant_name_defaults_to_bundle() -> None:
    config = ExperimentConfig.from_dict({"salt": "x", "variants": [{"bundle": "only"}]})
    assert config.variants == (Variant("only", "only", 1.0),)
    assert ExperimentRouter(config).assign("u:1") == "only"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"salt": ""}, "salt"),
        ({"variants": []}, "variants: needs at least one variant"),
        (
            {"variants": [{"bundle": "x", "weight": float("inf")}]},
            "variants[0].weight: Input should be a finite number",
        ),
        ({"variants": [{"weight": 2}]}, "variants[0].bundle: required"),
        (
            {"variants": [{"bundle": "x", "weight": 0}]},
            "variants[0].weight: Input should be greater than 0 (got 0)",
        ),
        (
            {"variants": [{"bundle": "x", "weight": "heavy"}]},
            "variants[0].weight: Input should be a valid number",
        ),
        ({"variants": [{"name": "a", "bundle": "x"}, {"name": "a", "bundle": "y"}]}, "unique"),
        (
            {"shadows": [{"bundle": "s", "sample_rate": 1.5}]},
            "shadows[0].sample_rate: Input should be less than or equal to 1 (got 1.5)",
        ),
        (
            {"shadows": [{"bundle": "s", "rate": 0.5}]},
            "shadows[0].rate: unknown key (known: bundle, sample_rate)",
        ),
        ({"weights": [1]}, "weights: unknown key"),
    ],
)
def test_bad_configs_are_refused_with_the_field_named(change: dict[str, object], message: str) -> None:
    with pytest.raises(ExperimentConfigError, match=r"exp\.yaml") as err:
        ExperimentConfig.from_dict({**CONFIG, **change}, source="exp.yaml")
    assert message in str(err.value)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(ExperimentConfigError, match=r"missing\.yaml: cannot read"):
        ExperimentConfig.load(tmp_path / "missing.yaml")


def test_the_shadow_overlay_example_is_a_valid_experiment() -> None:
    config = ExperimentConfig.load(ROOT / "k8s" / "overlays" / "shadow" / "experiments.yaml")
    assert [v.name for v in config.variants] == ["control", "treatment"]
    assert config.shadows and config.shadows[0].sample_rate == pytest.approx(0.05)


# ---- assignment ---------------------------------------------------------------------------------


def test_user_key_prefers_user_id_and_hashes_anonymous_histories() -> None:
    assert user_key("42", ["a", "b"]) == "u:42"
    anon = user_key(None, ["a", "b"])
    assert anon.startswith("h:") and anon == user_key("", ["a", "b"])
    assert anon != user_key(None, ["ab"]) != user_key(None, ["b", "a"])


def test_unit_hash_is_uniform_in_unit_interval_and_salted() -> None:
    values = [unit_hash("salt", str(i)) for i in range(2000)]
    assert all(0.0 <= v < 1.0 for v in values)
    deciles = Counter(int(v * 10) for v in values)
    assert chi_square([deciles[i] for i in range(10)], [200.0] * 10) < 27.877  # df=9, alpha=0.001
    assert unit_hash("salt", "1") != unit_hash("other", "1")
    assert unit_hash("s", "ab", "c") != unit_hash("s", "a", "bc")


def test_assignment_is_sticky_across_calls_and_replicas() -> None:
    config = ExperimentConfig.from_dict(CONFIG)
    replica_1, replica_2 = ExperimentRouter(config), ExperimentRouter(ExperimentConfig.from_dict(CONFIG))
    keys = [f"u:user{i}" for i in range(2000)]
    first = [replica_1.assign(k) for k in keys]
    assert first == [replica_1.assign(k) for k in keys]
    assert first == [replica_2.assign(k) for k in keys]
    assert first == [replica_1.assign(k) for k in reversed(keys)][::-1]
    assert {replica_1.bundle_of(v) for v in first} == {"bundle-a", "bundle-b", "bundle-c"}


def test_assignment_matches_the_weights_chi_square() -> None:
    router = ExperimentRouter(ExperimentConfig.from_dict(CONFIG))
    n = 30_000
    counts = Counter(router.assign(f"u:user{i}") for i in range(n))
    observed = [counts["a"], counts["b"], counts["c"]]
    expected = [n * 0.5, n * 0.3, n * 0.2]
    assert chi_square(observed, expected) < CHI2_CRIT_001[2], (observed, expected)


def test_a_new_salt_reshuffles_users() -> None:
    keys = [f"u:user{i}" for i in range(3000)]
    before = ExperimentRouter(ExperimentConfig.from_dict(CONFIG))
    after = ExperimentRouter(ExperimentConfig.from_dict({**CONFIG, "salt": "s2"}))
    moved = sum(before.assign(k) != after.assign(k) for k in keys) / len(keys)
    # independent draws with p = (.5, .3, .2) disagree with probability 1 - (.25 + .09 + .04) = 0.62
    assert 0.55 < moved < 0.69


def test_shadow_sampling_matches_the_rate_and_is_deterministic() -> None:
    router = ExperimentRouter(ExperimentConfig.from_dict(CONFIG))
    n = 20_000
    sampled = [bool(router.shadow_targets(f"u:user{i}")) for i in range(n)]
    hits = sum(sampled)
    assert chi_square([hits, n - hits], [n * 0.1, n * 0.9]) < CHI2_CRIT_001[1]
    assert sampled == [bool(router.shadow_targets(f"u:user{i}")) for i in range(n)]
    # independent of the variant split: every variant gets about 10 % shadowed
    per_variant = Counter(router.assign(f"u:user{i}") for i in range(n) if sampled[i])
    for variant, share in (("a", 0.5), ("b", 0.3), ("c", 0.2)):
        assert per_variant[variant] / hits == pytest.approx(share, abs=0.04)


# ---- reload -------------------------------------------------------------------------------------


def _reloads(result: str) -> float:
    return REGISTRY.get_sample_value("genret_experiment_reloads_total", {"result": result}) or 0.0


def test_experiment_file_reloads_on_change_and_keeps_the_last_good(tmp_path: Path) -> None:
    path = write_config(tmp_path / "exp.yaml", CONFIG)
    source = ExperimentFile(path, check_interval_s=0.0)
    assert source.router().config.salt == "s1"
    write_config(path, {**CONFIG, "salt": "s2-longer-so-the-size-changes"})
    assert source.router().config.salt == "s2-longer-so-the-size-changes"
    errors = _reloads("error")
    path.write_text("variants: [this is: not valid")
    assert source.router().config.salt == "s2-longer-so-the-size-changes"
    assert _reloads("error") == errors + 1
    assert source.router().config.salt == "s2-longer-so-the-size-changes"  # no retry until the next edit


def test_router_from_settings(tmp_path: Path) -> None:
    assert router_from_settings(Settings()) is None
    path = write_config(tmp_path / "exp.yaml", CONFIG)
    hooks = router_from_settings(Settings(experiments_file=path, shadow_queue_size=7))
    assert hooks is not None and hooks.shadow_log is None and hooks.shadow_config.queue_size == 7
    assert hooks.assign("u:1") == ExperimentRouter(ExperimentConfig.from_dict(CONFIG)).assign("u:1")
    with pytest.raises(ValidationError, match="shadow_queue_size"):
        Settings(experiments_file=path, shadow_queue_size=0)


def test_router_from_settings_reads_the_genret_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path / "exp.yaml", CONFIG)
    monkeypatch.setenv("GENRET_EXPERIMENTS_FILE", "")
    assert router_from_settings(Settings()) is None  # empty = unset, as docker compose passes it
    monkeypatch.setenv("GENRET_EXPERIMENTS_FILE", str(path))
    monkeypatch.setenv("GENRET_SHADOW_QUEUE_SIZE", "7")
    monkeypatch.setenv("GENRET_SHADOW_LOG", str(tmp_path / "shadow.jsonl"))
    hooks = router_from_settings(Settings())
    assert hooks is not None and hooks.shadow_log is not None and hooks.shadow_config.queue_size == 7
    asyncio.run(hooks.aclose())
    monkeypatch.setenv("GENRET_SHADOW_QUEUE_SIZE", "0")
    with pytest.raises(ValidationError, match="shadow_queue_size"):
        Settings()


# ---- hooks: what the engine calls ---------------------------------------------------------------


def _result(
    items: list[str], variant: str, fallback: Literal["popular"] | None = None, latency_s: float = math.nan
) -> Retrieval:
    return Retrieval(
        items=tuple(items),
        scores=(1.0,) * len(items),
        model=ModelIdentity(name="bundle-a", version="v1", method="uri"),
        variant=variant,
        unknown_history_items=0,
        truncated=False,
        fallback=fallback,
        fewer=None,
        batch_size=1,
        num_candidates=len(items),
        history_used=2,
        latency_s=latency_s,
    )


def test_hooks_shadow_sampled_requests_and_log_them(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "exp.yaml", {**CONFIG, "shadows": [{"bundle": "bundle-s", "sample_rate": 1.0}]}
    )
    shadow_log = ShadowLog(tmp_path / "shadow.jsonl")
    hooks = ExperimentHooks(ExperimentFile(path), ShadowConfig(queue_size=8), shadow_log)
    seen: list[RetrieveRequest] = []

    async def run_shadow(request: RetrieveRequest) -> Ranked:
        seen.append(request)
        return Ranked(items=("i1", "i9"), bundle=str(request.model), version="v2", latency_s=0.004)

    async def scenario() -> list[int]:
        hooks.start_lane(run_shadow, primary_idle=lambda: True)
        request = RetrieveRequest(user_id="u7", history=["i1", "i2"], k=2)
        queued = [
            hooks.maybe_shadow(request, _result(["i1", "i2"], "a", latency_s=0.002)),
            hooks.maybe_shadow(request.model_copy(update={"model": "bundle-b"}), _result(["i1"], "a")),
            hooks.maybe_shadow(request, _result(["i3"], "a", fallback="popular")),
        ]
        assert hooks.lane is not None
        await hooks.lane.join()
        await hooks.aclose()
        return queued

    assert asyncio.run(scenario()) == [1, 0, 0]  # explicit model and popular fallback are not shadowed
    assert [r.model for r in seen] == ["bundle-s"] and seen[0].history == ["i1", "i2"]
    (record,) = read_records(tmp_path / "shadow.jsonl")
    assert record["variant"] == "a" and record["experiment"] == "exp-1"
    assert record["primary"] == {
        "bundle": "bundle-a",
        "version": "v1",
        "items": ["i1", "i2"],
        "latency_ms": 2.0,
    }
    assert record["shadow"]["items"] == ["i1", "i9"] and record["shadow"]["latency_ms"] == 4.0
    assert record["agreement"]["overlap_at_k"] == 0.5
    assert "u7" not in record["user"] and "user_id" not in record["request"]
    assert record["request"] == {"history": ["i1", "i2"], "k": 2, "model": "bundle-s"}


def test_ranked_from_result_keeps_rank_order_and_model_identity() -> None:
    ranked = ranked_from_result(_result(["i3", "i1", "i2"], "a"), 0.01)
    assert ranked == Ranked(items=("i3", "i1", "i2"), bundle="bundle-a", version="v1", latency_s=0.01)
