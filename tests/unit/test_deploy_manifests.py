"""Deployment files: the offline checks of scripts/validate_deploy.sh, then properties of the
rendered Kubernetes manifests that a schema cannot express (probe paths, non-root, read-only root
filesystem, grace period covering preStop + the service's whole shutdown as Settings computes it,
every ConfigMap key a setting, GPU requests, network exposure: admin port internal, egress to
DNS and Redis only).

The script is run as is (hadolint, the compose schema, kubectl kustomize + kubernetes-validate
--strict); a broken copy of docker/ and k8s/ checks that each stage can fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.settings import Settings
from service.startup import known_variables

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "validate_deploy.sh"
OVERLAYS = ("cpu", "gpu", "shadow", "managed-redis", "catalogue-stream")
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl is not installed: `kubectl kustomize` renders the k8s/ overlays"
)


def run_script(check: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), check],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def render(kustomization: Path) -> list[dict[str, Any]]:
    assert KUBECTL is not None
    out = subprocess.run(
        [KUBECTL, "kustomize", str(kustomization)], capture_output=True, text=True, check=True, timeout=60
    )
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def overlays() -> dict[str, list[dict[str, Any]]]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed")
    return {name: render(ROOT / "k8s" / "overlays" / name) for name in OVERLAYS}


def one(docs: list[dict[str, Any]], kind: str, name: str, exact: bool = False) -> dict[str, Any]:
    """The one object of ``kind`` whose name is ``name`` or (generated names) starts with it."""
    found = [
        d
        for d in docs
        if d["kind"] == kind
        and (d["metadata"]["name"] == name or (not exact and d["metadata"]["name"].startswith(name)))
    ]
    assert len(found) == 1, f"expected one {kind}/{name}*, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def server_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = one(docs, "Deployment", "genret")["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "genret"]
    return dict(container)


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for d in docs:
        spec = d.get("spec", {})
        if d["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield f"{d['kind']}/{d['metadata']['name']}", spec["template"]["spec"]
        elif d["kind"] == "PyTorchJob":
            for role, replica in spec["pytorchReplicaSpecs"].items():
                yield f"PyTorchJob/{d['metadata']['name']}/{role}", replica["template"]["spec"]


# ---- the script: every stage passes on the repo and fails on a broken copy -------------------------


def test_dockerfiles_lint_and_compose_is_valid() -> None:
    for check in ("hadolint", "compose"):
        result = run_script(check)
        assert result.returncode == 0, f"{check}:\n{result.stdout}\n{result.stderr}"


@needs_kubectl
def test_every_kustomization_renders_and_validates(tmp_path: Path) -> None:
    result = run_script("k8s", RENDER_DIR=str(tmp_path))
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    rendered = sorted(p.name for p in tmp_path.glob("*.yaml"))
    assert rendered == sorted(
        f"{k}.yaml" for k in ("base", "trainer", "jobs_bundle-sync", *(f"overlays_{o}" for o in OVERLAYS))
    )


@pytest.fixture
def broken_copy(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "docker", tmp_path / "docker")
    shutil.copytree(ROOT / "k8s", tmp_path / "k8s")
    return tmp_path


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_script_fails_on_unpinned_base_image(broken_copy: Path) -> None:
    (broken_copy / "docker" / "Dockerfile.bad").write_text('FROM ubuntu:latest\nCMD ["true"]\n')
    result = run_script("hadolint", DOCKER_DIR=str(broken_copy / "docker"))
    assert result.returncode == 1
    assert "DL3007" in result.stdout + result.stderr


def test_script_fails_on_bad_compose(broken_copy: Path) -> None:
    compose = broken_copy / "docker" / "compose.yaml"
    _edit(compose, "condition: service_healthy", "condition: service_green")
    result = run_script("compose", DOCKER_DIR=str(broken_copy / "docker"))
    assert result.returncode == 1
    assert "service_green" in result.stderr


@needs_kubectl
def test_script_fails_on_unknown_field_and_bad_custom_resource(broken_copy: Path) -> None:
    base = broken_copy / "k8s" / "base"
    _edit(base / "deployment.yaml", "failureThreshold: 60", "failureTreshold: 60")
    _edit(base / "servicemonitor.yaml", "path: /metrics", "paths: /metrics")
    result = run_script("k8s", K8S_DIR=str(broken_copy / "k8s"), RENDER_DIR=str(broken_copy / "out"))
    assert result.returncode == 1
    assert "failureTreshold" in result.stderr
    assert "ServiceMonitor/genret" in result.stderr and "paths" in result.stderr


# ---- properties of the rendered manifests --------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_probes_and_shutdown(overlays: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    docs = overlays[overlay]
    pod = one(docs, "Deployment", "genret")["spec"]["template"]["spec"]
    c = server_container(docs)
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "startup must cover bundle load"
    assert c["ports"][0]["containerPort"] == 8000
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    settings = settings_of(docs)
    assert settings.shutdown_grace_s == 25  # the value the deployment's comment reasons about
    needed = pre_stop + settings.shutdown_budget_s
    assert pod["terminationGracePeriodSeconds"] > needed, (
        f"terminationGracePeriodSeconds={pod['terminationGracePeriodSeconds']} must exceed preStop {pre_stop}s "
        f"+ the service's shutdown budget {settings.shutdown_budget_s}s"
    )


SECRET_STANDINS = {"GENRET_CATALOGUE_REDIS_URL": "redis://:secret@genret-catalogue-redis:6379/0"}
"""What a setting the pod takes from the Secret is, for validating the rest (never a real value)."""


def settings_of(docs: list[dict[str, Any]]) -> Settings:
    """The Settings a pod gets from the rendered ConfigMap, with stand-ins for the URL-valued
    settings its container takes from the Secret (passwords and tokens are not needed)."""
    data = dict(one(docs, "ConfigMap", "genret-settings")["data"])
    for entry in server_container(docs).get("env", []):
        if entry["name"] in SECRET_STANDINS and "secretKeyRef" in entry.get("valueFrom", {}):
            data[entry["name"]] = SECRET_STANDINS[entry["name"]]
    return Settings(**{key.removeprefix("GENRET_").lower(): value for key, value in data.items()})


def settings_env_keys() -> dict[str, list[str]]:
    """Every key the kustomizations put into genret-settings, by file, read without kubectl."""
    found: dict[str, list[str]] = {}
    for path in (ROOT / "k8s").rglob("kustomization.yaml"):
        for generator in yaml.safe_load(path.read_text()).get("configMapGenerator", []):
            if generator["name"] != "genret-settings":
                continue
            keys = [lit.split("=", 1)[0] for lit in generator.get("literals", [])]
            for env_file in generator.get("envs", []):
                lines = (path.parent / env_file).read_text().splitlines()
                keys += [line.split("=", 1)[0] for line in lines if line.strip() and not line.startswith("#")]
            found[str(path.relative_to(ROOT))] = keys
    return found


def test_every_settings_key_in_k8s_is_a_setting() -> None:
    """A misspelled key (GENRET_MAX_KK) would be silently ignored by pydantic and refused at start."""
    found = settings_env_keys()
    assert len(found) >= 4  # base + the gpu component + the shadow and managed-redis overlays
    known = known_variables()
    for path, keys in found.items():
        assert keys, path
        unknown = [k for k in keys if k not in known]
        assert not unknown, f"{path}: {unknown} are not settings (service/settings.py)"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_settings_validate(overlays: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    settings = settings_of(overlays[overlay])
    assert settings.env == "prod" and settings.redis_connection_url() is not None
    assert (
        settings.header_timeout_s <= 10 and settings.body_timeout_s <= 30 and settings.max_connections >= 256
    )


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_is_non_root_with_read_only_root(
    overlays: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    docs = overlays[overlay]
    pod = one(docs, "Deployment", "genret")["spec"]["template"]["spec"]
    c = server_container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]], "/tmp must be a writable emptyDir"
    bundles = volumes[mounts["/bundles"]["name"]]
    assert mounts["/bundles"]["readOnly"] is True and bundles["persistentVolumeClaim"]["readOnly"] is True


@needs_kubectl
def test_every_workload_is_non_root_with_read_only_root(overlays: dict[str, list[dict[str, Any]]]) -> None:
    docs = [d for overlay in overlays.values() for d in overlay]
    docs += render(ROOT / "k8s" / "trainer") + render(ROOT / "k8s" / "jobs" / "bundle-sync")
    seen = 0
    for name, pod in pod_specs(docs):
        for c in pod["containers"]:
            non_root = c.get("securityContext", {}).get(
                "runAsNonRoot", pod["securityContext"].get("runAsNonRoot")
            )
            assert non_root is True, f"{name}/{c['name']} may run as root"
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, f"{name}/{c['name']}"
            seen += 1
    assert seen >= 6


@needs_kubectl
def test_gpu_overlays_request_a_gpu_and_cpu_does_not(overlays: dict[str, list[dict[str, Any]]]) -> None:
    for overlay in ("gpu", "shadow", "managed-redis"):
        pod = one(overlays[overlay], "Deployment", "genret")["spec"]["template"]["spec"]
        c = server_container(overlays[overlay])
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1", overlay
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]), overlay
        assert "genret-gpu" in c["image"]
        settings = one(overlays[overlay], "ConfigMap", "genret-settings")["data"]
        assert settings["GENRET_DEVICE"] == "cuda"
    c = server_container(overlays["cpu"])
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    assert "genret-cpu" in c["image"]


@needs_kubectl
def test_redis_self_hosted_or_managed(overlays: dict[str, list[dict[str, Any]]]) -> None:
    for overlay in ("cpu", "gpu", "shadow"):
        one(overlays[overlay], "StatefulSet", "genret-redis")
        redis_port = one(overlays[overlay], "Service", "genret-redis", exact=True)["spec"]["ports"][0]["port"]
        settings = settings_of(overlays[overlay])
        assert (settings.redis_host, settings.redis_port, settings.redis_tls) == (
            "genret-redis",
            redis_port,
            False,
        )
    managed = overlays["managed-redis"]
    assert not [d for d in managed if d["kind"] == "StatefulSet"]
    assert settings_of(managed).redis_tls is True
    for overlay in OVERLAYS:
        env = {e["name"]: e for e in server_container(overlays[overlay])["env"]}
        assert "GENRET_REDIS_URL" not in env, "the URL is built by the service, the password escaped"
        assert env["GENRET_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "genret-secrets"
        assert env["GENRET_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "genret-secrets"


@needs_kubectl
def test_the_catalogue_stream_overlay_needs_no_shared_volume(
    overlays: dict[str, list[dict[str, Any]]],
) -> None:
    docs = overlays["catalogue-stream"]
    assert settings_of(docs).catalogue_log == "redis"
    assert settings_of(overlays["cpu"]).catalogue_log == "dir"
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    assert "genret-catalogue" not in claims and "genret-catalogue" in {  # the directory log's RWX volume
        d["metadata"]["name"] for d in overlays["cpu"] if d["kind"] == "PersistentVolumeClaim"
    }
    stream = one(docs, "StatefulSet", "genret-catalogue-redis")
    args = stream["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"  # the service refuses any other
    assert args[args.index("--appendonly") + 1] == "yes"
    assert stream["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    env = {e["name"]: e for e in server_container(docs)["env"]}
    assert env["GENRET_CATALOGUE_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "genret-secrets"


def egress_rules(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    server = {"app.kubernetes.io/name": "genret", "app.kubernetes.io/component": "server"}
    rules: list[dict[str, Any]] = []
    for policy in docs:
        spec = policy.get("spec", {})
        if policy["kind"] == "NetworkPolicy" and "Egress" in spec["policyTypes"]:
            rules += spec["egress"] if spec["podSelector"]["matchLabels"] == server else []
    return rules


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_egress_is_dns_and_redis_only(overlays: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    docs = overlays[overlay]
    settings = settings_of(docs)
    rules = egress_rules(docs)
    assert rules, "no egress policy: the pods may reach anything"
    kinds = set()
    for rule in rules:
        ports = {(p["port"], p["protocol"]) for p in rule["ports"]}
        (peer,) = rule["to"]
        if ports <= {(53, "UDP"), (53, "TCP")}:
            assert peer["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
            kinds.add("dns")
        else:
            assert ports == {(settings.redis_port, "TCP")}, rule
            if "podSelector" in peer:
                assert peer["podSelector"]["matchLabels"] in (
                    {"app.kubernetes.io/name": "genret-redis"},
                    {"app.kubernetes.io/name": "genret-catalogue-redis"},
                )
            else:
                assert "except" not in peer["ipBlock"] and not peer["ipBlock"]["cidr"].endswith("/0")
            kinds.add("redis")
    assert kinds == {"dns", "redis"}


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_admin_port_is_not_exposed(overlays: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    docs = overlays[overlay]
    settings = settings_of(docs)
    assert settings.admin_host == "127.0.0.1" and settings.admin_port != settings.port
    assert [p["containerPort"] for p in server_container(docs)["ports"]] == [settings.port]
    assert [p["targetPort"] for p in one(docs, "Service", "genret", exact=True)["spec"]["ports"]] == ["http"]
    policy = one(docs, "NetworkPolicy", "genret-ingress")["spec"]
    assert {p["port"] for rule in policy["ingress"] for p in rule["ports"]} == {"http"}


@needs_kubectl
def test_only_frontend_and_prometheus_reach_the_server(overlays: dict[str, list[dict[str, Any]]]) -> None:
    policy = one(overlays["cpu"], "NetworkPolicy", "genret-ingress")["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    sources = [peer for rule in policy["ingress"] for peer in rule["from"]]
    namespaces = {p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for p in sources}
    assert namespaces == {"frontend", "monitoring"}
    (prom,) = [p for p in sources if "podSelector" in p]
    assert prom["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "prometheus"
    monitor = one(overlays["cpu"], "ServiceMonitor", "genret")["spec"]
    assert monitor["endpoints"][0]["path"] == "/metrics"


@needs_kubectl
def test_shadow_overlay_mounts_the_experiment_file(overlays: dict[str, list[dict[str, Any]]]) -> None:
    docs = overlays["shadow"]
    path = Path(one(docs, "ConfigMap", "genret-settings")["data"]["GENRET_EXPERIMENTS_FILE"])
    experiments = one(docs, "ConfigMap", "genret-experiments")
    assert experiments["metadata"]["name"] == "genret-experiments", "no hash suffix: edits must reach pods"
    mounts = {m["mountPath"]: m["name"] for m in server_container(docs)["volumeMounts"]}
    assert str(path.parent) in mounts and path.name in experiments["data"]
    config = yaml.safe_load(experiments["data"][path.name])
    assert sum(v["weight"] for v in config["variants"]) == pytest.approx(1.0)
    assert all(0 < s["sample_rate"] <= 1 for s in config["shadows"])


def test_dockerfiles_run_as_non_root_and_probe_healthz() -> None:
    for name in ("Dockerfile.cpu", "Dockerfile.gpu", "Dockerfile.trainer"):
        text = (ROOT / "docker" / name).read_text()
        runtime = text.split("AS runtime", 1)[1]
        assert re.search(r"^USER 10001", runtime, re.M), f"{name}: runtime stage must not run as root"
        assert "apt-get install" not in runtime or "build-essential" not in runtime
        deps = re.search(r"^COPY docker/requirements-\S+\.txt .*/tmp/", text, re.M)
        assert deps is not None and deps.start() < text.index("COPY models"), (
            f"{name}: dependencies must be installed before the code"
        )
        if name != "Dockerfile.trainer":
            assert re.search(r"HEALTHCHECK .*\n.*urllib.*/healthz", runtime), name


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_runs_the_serving_entry_point(overlays: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    c = server_container(overlays[overlay])
    assert c["command"] == ["genret-serve"] and not c.get("args"), (c.get("command"), c.get("args"))


def test_serving_images_hold_only_service_and_models() -> None:
    """The serving images copy service/ and models/ (their context holds nothing else of the code)
    and start the serving entry point; the trainer image holds every package, for `genret`."""
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        text = (ROOT / "docker" / name).read_text()
        copied = re.findall(r"^COPY (?!--from)(\S+) ", text, re.M)
        assert sorted(c for c in copied if not c.startswith(("docker/", "pyproject"))) == [
            "models",
            "service",
        ]
        assert "requirements-serve.txt" in text and "requirements-trainer.txt" not in text
        assert re.search(r'^ENTRYPOINT \["genret-serve"\]$', text, re.M), name
        assert not re.search(r"^CMD ", text.split("AS runtime", 1)[1], re.M), (
            f"{name}: genret-serve takes no command"
        )
        allowed = [
            line
            for line in (ROOT / "docker" / f"{name}.dockerignore").read_text().splitlines()
            if line.startswith("!")
        ]
        assert sorted(allowed) == [
            "!README.md",
            "!docker/requirements-serve.txt",
            "!models/**",
            "!pyproject.toml",
            "!service/**",
        ]
    trainer = (ROOT / "docker" / "Dockerfile.trainer").read_text()
    for package in ("models", "training", "service", "cli", "benchmarks"):
        assert f"COPY {package} ./{package}" in trainer
