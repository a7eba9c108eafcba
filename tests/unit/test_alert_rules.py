"""The alert rules and the Grafana dashboard that ship with genret.

* ``promtool check rules`` on docker/alerts/genret.rules.yml and ``promtool test rules`` on its unit
  tests (docker/alerts/genret.rules.test.yml); `make test` installs promtool (Debian's
  ``prometheus`` package) when it is missing, as it does redis-server;
* the PrometheusRule in k8s/base carries exactly the same groups as the compose rule file;
* every metric (and every label a selector names) in the rules and the dashboard is one the service
  exports (``service/metrics.py`` and the modules that define their own);
* the dashboard has the panels on-call engineers expect, on the datasource the compose stack
  provisions, and compose mounts the rules where docker/prometheus.yml reads them.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "docker" / "alerts" / "genret.rules.yml"
RULE_TESTS = ROOT / "docker" / "alerts" / "genret.rules.test.yml"
K8S_RULE = ROOT / "k8s" / "base" / "prometheusrule.yaml"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "genret.json"
DATASOURCES = ROOT / "docker" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (`make test` installs it: apt-get install prometheus)"
)
# Prometheus' own series a rule may name besides genret's
PROMETHEUS_SERIES = {"up"}
# metrics another change is adding, named by the rules or dashboard before the service exports them;
# empty: every metric they name is exported (an entry that becomes exported fails the test too)
PENDING: frozenset[str] = frozenset()
METRIC = re.compile(r"\b(genret_[a-z0-9_]+|up)\b(\{[^}]*\})?")
LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=RULES.parent, capture_output=True, text=True, timeout=120, check=False
    )


@needs_promtool
def test_promtool_checks_the_rules() -> None:
    got = run("check", "rules", RULES.name)
    assert got.returncode == 0, got.stdout + got.stderr


@needs_promtool
def test_promtool_rule_tests_pass() -> None:
    got = run("test", "rules", RULE_TESTS.name)
    assert got.returncode == 0 and "SUCCESS" in got.stdout, got.stdout + got.stderr


@needs_promtool
def test_a_broken_rule_fails_promtool(tmp_path: Path) -> None:
    """The checks can fail: an expression that does not parse, and a rule test expecting the wrong alert."""
    bad = tmp_path / "bad.rules.yml"
    bad.write_text(RULES.read_text().replace("> 0.01", "> > 0.01", 1))
    assert run("check", "rules", str(bad)).returncode != 0
    wrong = tmp_path / "wrong.test.yml"
    shutil.copy(RULES, tmp_path / RULES.name)
    wrong.write_text(RULE_TESTS.read_text().replace("eval_time: 9m", "eval_time: 3m", 1))
    assert run("test", "rules", str(wrong)).returncode != 0


def test_the_k8s_prometheus_rule_carries_the_same_groups() -> None:
    compose = yaml.safe_load(RULES.read_text())
    k8s = yaml.safe_load(K8S_RULE.read_text())
    assert k8s["kind"] == "PrometheusRule" and k8s["spec"]["groups"] == compose["groups"]
    kustomization = yaml.safe_load((K8S_RULE.parent / "kustomization.yaml").read_text())
    assert K8S_RULE.name in kustomization["resources"]


def exported() -> dict[str, set[str]]:
    """Every sample name the service can export -> its label names (``le`` on buckets)."""
    import service

    for module in pkgutil.walk_packages(service.__path__, "service."):
        if not module.name.endswith("__main__"):  # that one runs the server
            importlib.import_module(module.name)
    from service.metrics import ADMIN_REGISTRY, REGISTRY

    out: dict[str, set[str]] = {}
    for registry in (REGISTRY, ADMIN_REGISTRY):
        for collector, names in registry._collector_to_names.items():
            labels = set(getattr(collector, "_labelnames", ()))
            for name in names:
                out[name] = labels | ({"le"} if name.endswith("_bucket") else set())
    return out


def expressions() -> list[tuple[str, str]]:
    """(where, PromQL) of every rule and dashboard target."""
    out = []
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            out.append((f"rule {rule['alert']}", str(rule["expr"])))
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel["targets"]:
            out.append((f"panel {panel['title']!r}", target["expr"]))
    return out


def test_every_metric_in_the_rules_and_the_dashboard_is_exported() -> None:
    known = exported()
    missing: dict[str, list[str]] = {}
    bad_labels: list[str] = []
    for where, expr in expressions():
        for name, selector in METRIC.findall(expr):
            if name in PROMETHEUS_SERIES:
                continue
            if name not in known:
                missing.setdefault(name, []).append(where)
                continue
            for label in LABEL.findall(selector or ""):
                if label not in known[name]:
                    bad_labels.append(f"{where}: {name} has no label {label!r} (has {sorted(known[name])})")
    assert set(missing) == PENDING, f"not exported: {missing}; pending: {sorted(PENDING)}"
    assert not bad_labels, bad_labels


def test_the_dashboard_has_what_on_call_expects() -> None:
    dash: dict[str, Any] = json.loads(DASHBOARD.read_text())
    text = " ".join(expr for _, expr in expressions() if _.startswith("panel"))
    for needed in (
        "genret_stage_duration_seconds_bucket",  # latency by stage
        "genret_request_duration_seconds_count",  # QPS
        "genret_errors_total",  # errors by kind
        'genret_cache_results_total{result="hit"}',  # cache hit rate
        "genret_cache_breaker_state",
        "genret_batch_size_bucket",
        "genret_catalogue_version",
        "genret_catalogue_lag_versions",
        "genret_catalogue_quarantined_total",
        "genret_quality_overlap",
    ):
        assert needed in text, needed
    assert "sum by (kind)" in text and "by (le, stage)" in text
    uids = {p["datasource"]["uid"] for p in dash["panels"]}
    provisioned = {d["uid"] for d in yaml.safe_load(DATASOURCES.read_text())["datasources"]}
    assert uids <= provisioned, (uids, provisioned)
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_compose_mounts_the_rules_and_the_dashboard() -> None:
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    prometheus = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    mounts = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["prometheus"]["volumes"]}
    for rule_file in prometheus["rule_files"]:
        assert (ROOT / "docker" / mounts[rule_file]).resolve() == RULES
    grafana = {v.split(":")[1]: v.split(":")[0] for v in compose["services"]["grafana"]["volumes"]}
    assert (ROOT / "docker" / grafana["/var/lib/grafana/dashboards"]).resolve() == DASHBOARD.parent
    assert (ROOT / "docker" / grafana["/etc/grafana/provisioning"]).resolve() == DATASOURCES.parents[1]
