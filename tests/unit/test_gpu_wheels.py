"""``scripts/gpu_wheels.txt``: every package the service needs beyond what a CUDA machine has is
listed, pinned to the version this venv runs, and the wheels fit the 64 MiB a check may carry.

The service's third-party imports are read from its source (``service/``, ``models/`` and the
benchmark modules the HTTP step runs), mapped to distributions, and closed over their requirements
(``importlib.metadata``); what the machine has (torch, numpy, onnx, onnxruntime, safetensors,
pytest, httpx and their own requirements) is subtracted. The size is bounded offline by the
installed size of the listed distributions (a wheel is a zip of those files); with a package
index reachable, ``make wheels`` runs into a temporary folder and its size is checked too.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
LIMIT_MIB = 64
MACHINE_HAS = ("torch", "numpy", "onnx", "onnxscript", "onnxruntime", "safetensors", "pytest", "httpx")
"""What the CUDA machines hold (docs/deployment.md, the GPU check), with their own requirements;
``onnxruntime`` there is the CPU build of the module this venv gets from ``onnxruntime-gpu``."""
SAME_MODULE = {"onnxruntime-gpu": "onnxruntime"}
HTTP_STEP = (
    "service",
    "models",
    "benchmarks/launcher.py",
    "benchmarks/load.py",
    "benchmarks/load_multi.py",
    "benchmarks/replicas.py",
    "benchmarks/wrk.py",
)
OPTIONAL = ("uvloop", "httptools")
"""Not imported by name: uvicorn picks them up when present (the event loop and parser it serves with here)."""


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def listed() -> dict[str, str]:
    out = {}
    for line in (ROOT / "scripts/gpu_wheels.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"gpu_wheels.txt: {line!r} is not name==version"
            out[canon(name)] = version
    return out


def imported_top_modules() -> set[str]:
    mods: set[str] = set()
    for entry in HTTP_STEP:
        path = ROOT / entry
        for f in [path] if path.is_file() else path.rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Import):
                    mods |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    mods.add(node.module.split(".")[0])
    return mods - set(sys.stdlib_module_names) - {"models", "service", "benchmarks", "training", "cli"}


def closure(names: set[str]) -> set[str]:
    """``names`` and every distribution they require (markers evaluated without extras)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for spec in requires:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canon(req.name))
    return seen


def test_every_package_the_http_step_needs_is_listed_at_this_venvs_version() -> None:
    wheels = listed()
    dists = md.packages_distributions()
    needed = {
        SAME_MODULE.get(canon(d), canon(d)) for mod in imported_top_modules() for d in dists.get(mod, [mod])
    }
    missing = closure(needed | set(OPTIONAL)) - closure({canon(n) for n in MACHINE_HAS}) - set(wheels)
    assert not missing, f"scripts/gpu_wheels.txt lacks {sorted(missing)}"
    for name, version in wheels.items():
        assert md.version(name) == version, f"{name}: listed {version}, this venv runs {md.version(name)}"
    assert "fastapi" in wheels and "uvicorn" in wheels and "pydantic-core" in wheels  # not vacuous


def test_the_listed_wheels_fit_the_carry_limit() -> None:
    total = 0
    for name in listed():
        files = md.distribution(name).files or []
        total += sum(f.size or 0 for f in files)
    assert total / 2**20 < LIMIT_MIB, f"installed size {total / 2**20:.1f} MiB"


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_wheels_downloads_them_within_the_limit(tmp_path: Path) -> None:
    out = tmp_path / "whl"
    run = subprocess.run(
        ["make", "-s", "wheels", f"WHEEL_DIR={out}"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    text = run.stdout + run.stderr
    if run.returncode != 0 and "No matching distribution" not in text and "over the" not in text:
        pytest.skip(f"no package index reachable: {text[-300:]}")
    assert run.returncode == 0, text[-2000:]
    names = {canon(p.name.split("-")[0]) for p in out.glob("*.whl")}
    assert names == set(listed()), names ^ set(listed())
    assert sum(p.stat().st_size for p in out.glob("*.whl")) / 2**20 < LIMIT_MIB
