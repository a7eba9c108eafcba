"""The GPU check runs where FastAPI, pydantic, uvicorn, the redis client, pandas and matplotlib
are absent: everything it imports must import without them.

A subprocess puts a finder in front of ``sys.meta_path`` that refuses those packages (as their
absence would), then imports every module of ``models``, what the check uses from ``training``,
the device-parametrised test module and the conftest files pytest loads for it, and builds the
``genret`` CLI parser with every command registered (``python -m cli bench ...``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ABSENT_ON_GPU_MACHINE = (
    "fastapi", "pydantic", "pydantic_settings", "uvicorn", "starlette", "redis",
    "pandas", "pyarrow", "matplotlib", "scipy", "sklearn", "faiss", "recbole",
)  # fmt: skip

PROBE = """
import importlib, pathlib, pkgutil, sys
ABSENT = set(sys.argv[1].split(","))

class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {name!r} (absent on the GPU machine)", name=name)
        return None

sys.meta_path.insert(0, Absent())
import models
for info in pkgutil.walk_packages(models.__path__, prefix="models."):
    importlib.import_module(info.name)
for name in ("benchmarks.synthetic_bundle", "training.export.writer", "training.export.torch_files",
             "benchmarks.search", "benchmarks.retrieve",
             "tests.unit.models.test_torch_bundle"):
    importlib.import_module(name)
for conftest in ("tests/conftest.py", "tests/unit/conftest.py", "tests/unit/models/conftest.py"):
    if pathlib.Path(conftest).is_file():  # pytest imports every conftest on the way to a test file
        importlib.import_module(conftest[:-3].replace("/", "."))
import cli.main
cli.main.build_parser().parse_args(["bench", "retrieve", "--device", "cpu"])
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ABSENT)
assert not leaked, leaked
print("imports ok")
"""


def test_gpu_check_imports_nothing_the_gpu_machine_lacks() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, ",".join(ABSENT_ON_GPU_MACHINE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("imports ok")
