"""The serving side's import graph holds ``service`` and ``models`` only.

Each case runs in a fresh interpreter (nothing imported by pytest leaks in) and prints the
top-level packages of everything in ``sys.modules`` afterwards: importing the serving app (and
every module of ``service``), the ``genret-serve`` console script's ``--help`` (resolved through
its installed entry point) and ``python -m service --help`` must load no ``training``, ``cli`` or
``benchmarks`` module;
``genret serve --help`` loads ``cli`` but neither of the other two. A control case
(``genret train --help``) shows that the probe does see ``training`` when it is loaded. The
package must be installed (``make install``: ``pip install -e .``), as the scripts come from it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

NOT_SERVING = {"training", "cli", "benchmarks"}

REPORT = """
import json, sys
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""

CASES = {
    "import service.app": "from service.app import create_app, create_admin_app",
    "import every service module": """
import importlib, pkgutil, service
for info in pkgutil.walk_packages(service.__path__, prefix="service."):
    if info.name != "service.__main__":
        importlib.import_module(info.name)
""",
    "genret-serve --help": """
from importlib.metadata import entry_points
(script,) = entry_points(group="console_scripts", name="genret-serve")
try:
    script.load()(["--help"])
except SystemExit:
    pass
""",
    "python -m service --help": """
import runpy
sys.argv = ["service", "--help"]
try:
    runpy.run_module("service", run_name="__main__", alter_sys=True)
except SystemExit:
    pass
""",
    "genret serve --help": """
from cli.main import main
try:
    main(["serve", "--help"])
except SystemExit:
    pass
""",
    "genret train --help": """
from cli.main import main
try:
    main(["train", "--help"])
except SystemExit:
    pass
""",
}


def loaded_packages(code: str, cwd: Path) -> set[str]:
    # run outside the checkout: a stale ``genret.egg-info`` there would shadow the installed
    # entry points; the packages come from the (editable) install, as for a user
    result = subprocess.run(
        [sys.executable, "-c", "import sys\n" + code + REPORT],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize(
    "case",
    ["import service.app", "import every service module", "genret-serve --help", "python -m service --help"],
)
def test_serving_loads_no_trainer_cli_or_benchmarks(case: str, tmp_path: Path) -> None:
    packages = loaded_packages(CASES[case], tmp_path)
    assert "service" in packages
    assert not packages & NOT_SERVING, f"{case} loaded {sorted(packages & NOT_SERVING)}"


def test_genret_serve_alias_loads_no_trainer_or_benchmarks(tmp_path: Path) -> None:
    packages = loaded_packages(CASES["genret serve --help"], tmp_path)
    assert {"cli", "service"} <= packages
    assert not packages & {"training", "benchmarks"}, sorted(packages & {"training", "benchmarks"})


def test_the_probe_sees_training_when_a_training_command_runs(tmp_path: Path) -> None:
    assert "training" in loaded_packages(CASES["genret train --help"], tmp_path)


def test_genret_serve_script_is_installed_and_answers_help() -> None:
    script = Path(sysconfig.get_path("scripts")) / "genret-serve"
    assert script.is_file(), f"{script} missing: reinstall the package (pip install -e .)"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: genret-serve")
