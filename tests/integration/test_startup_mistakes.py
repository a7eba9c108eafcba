"""Every kind of start-up mistake ends `genret serve` (a real process) with one line naming the setting
or the file, and exit status 2: the checks before uvicorn starts (service/startup.py) and the failures
of the app's start-up itself (a corrupt bundle, an experiment file that does not parse, a default model
that is not loaded), which service/server.py prints the same way. The progress lines logged at INFO
before the failure are not part of the answer; nothing else may be printed (no traceback, no ERROR).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.launcher import free_port

pytestmark = pytest.mark.integration

# progress logged before the failure: uvicorn's "INFO:     ..." and the service's "<date> <time> INFO name: ..."
PROGRESS = re.compile(r"^(INFO:\s|\d{4}-\d\d-\d\d [\d:,]+ INFO )")


def serve_once(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env={
            "PATH": "/usr/bin:/bin",
            "GENRET_HOST": "127.0.0.1",
            "GENRET_PORT": str(free_port()),
            "GENRET_QUALITY_SAMPLE": "0",
            "OMP_NUM_THREADS": "1",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def corrupt_bundle(bundle_dir: Path, tmp: Path) -> Path:
    broken = tmp / "broken"
    shutil.copytree(bundle_dir, broken)
    with open(broken / "decoder.onnx", "ab") as fh:
        fh.write(b"tampered")
    return broken


def bad_experiments(tmp: Path) -> Path:
    path = tmp / "experiments.yaml"
    path.write_text("name: x\nvariants: [{name: a, bundle: nope, weight: 1}\n")  # unclosed list
    return path


CASES = {
    # case: (args, env builder given (bundle_dir, tmp_path, busy_port), what the one line must name)
    "corrupt bundle": (
        lambda b, t, p: (["--bundle", str(corrupt_bundle(b, t))], {}),
        "decoder.onnx",
    ),
    "redis url not a url": (
        lambda b, t, p: (["--bundle", str(b)], {"GENRET_REDIS_URL": "notaurl"}),
        "GENRET_REDIS_URL",
    ),
    "redis url with a bad port": (
        lambda b, t, p: (["--bundle", str(b)], {"GENRET_REDIS_URL": "redis://:s3cret@h:xx/0"}),
        "GENRET_REDIS_URL",
    ),
    "redis url with a bad database": (
        lambda b, t, p: (["--bundle", str(b)], {"GENRET_REDIS_URL": "redis://h:6379/zero"}),
        "GENRET_REDIS_URL",
    ),
    "redis ca file missing": (
        lambda b, t, p: (
            ["--bundle", str(b)],
            {"GENRET_REDIS_HOST": "h", "GENRET_REDIS_TLS": "true", "GENRET_REDIS_CA_FILE": str(t / "ca.pem")},
        ),
        "GENRET_REDIS_CA_FILE",
    ),
    "experiments file missing": (
        lambda b, t, p: (["--bundle", str(b)], {"GENRET_EXPERIMENTS_FILE": str(t / "none.yaml")}),
        "GENRET_EXPERIMENTS_FILE",
    ),
    "experiments file malformed": (
        lambda b, t, p: (["--bundle", str(b)], {"GENRET_EXPERIMENTS_FILE": str(bad_experiments(t))}),
        "experiments.yaml",
    ),
    "default model not loaded": (
        lambda b, t, p: (["--bundle", str(b)], {"GENRET_DEFAULT_MODEL": "nomodel"}),
        "GENRET_DEFAULT_MODEL",
    ),
    "device unknown": (lambda b, t, p: (["--bundle", str(b)], {"GENRET_DEVICE": "banana"}), "GENRET_DEVICE"),
    "admin port busy": (
        lambda b, t, p: (
            ["--bundle", str(b)],
            {"GENRET_ADMIN_TOKEN": "a-token-of-16-chars-or-more", "GENRET_ADMIN_PORT": str(p)},
        ),
        "GENRET_ADMIN_PORT",
    ),
    "bad setting value": (
        lambda b, t, p: (["--bundle", str(b)], {"GENRET_QUEUE_SIZE": "lots"}),
        "GENRET_QUEUE_SIZE",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_startup_mistake_is_one_line_naming_it_and_exit_2(
    case: str, bundle_dir: Path, tmp_path: Path, busy_port: int
) -> None:
    build, named = CASES[case]
    args, env = build(bundle_dir, tmp_path, busy_port)
    got = serve_once(args, env)
    said = [line for line in got.stderr.splitlines() if line.strip() and not PROGRESS.match(line)]
    assert got.returncode == 2, (case, got.returncode, got.stderr)
    assert len(said) == 1 and said[0].startswith("genret serve: ") and named in said[0], (case, got.stderr)
    assert "Traceback" not in got.stdout + got.stderr and "ERROR" not in got.stderr, (case, got.stderr)
    assert "s3cret" not in got.stderr  # a URL's password is never echoed
