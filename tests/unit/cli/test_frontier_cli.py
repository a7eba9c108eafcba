"""`genret compare` reports each generative method's candidates and the IVF figure at that budget;
`genret frontier` reads the compare run's bundle and writes the table, JSON and plot (synthetic data,
a SEATER trained for one epoch on a sample of pairs: seconds, not minutes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss")

from cli.main import main

QUICK = ["--data", "synthetic", "--max-epochs", "1", "--set", "max_train_pairs=2000"]


def test_compare_then_frontier(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("GENRET_CACHE_DIR", str(tmp_path / "cache"))
    workdir = tmp_path / "wd"
    assert main(["compare", *QUICK, "--methods", "sasrec,seater", "--json", "--workdir", str(workdir)]) == 0
    results = {r["method"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    assert results["sasrec"]["candidates"] is None  # not a generative method: no budget
    seater = results["seater"]
    manifest = json.loads((workdir / "seater" / "manifest.json").read_text())
    beam = manifest["config"]["beam_size"]
    assert beam == 100  # 500 items: the rule's floor of 100 candidates, one item per leaf
    # k=50 and history exclusion widen single-item leaves to at least k + excluded items
    assert seater["candidates"] >= beam and np.isfinite(seater["ivf_recall_at_budget"])
    assert 0.0 < seater["ivf_recall_at_budget"] <= 1.0

    png = tmp_path / "curve.png"
    argv = ["frontier", *QUICK, "--methods", "ivf,seater", "--bundle-dir", str(workdir)]
    assert main([*argv, "--workdir", str(workdir), "--beams", "4,16", "--json", "--png", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert png.stat().st_size > 0 and out["ivf_nlist"] == round(500 / 12)
    methods = [p["method"] for p in out["points"]]
    assert methods.count("ivf") == len(out["points"]) - 5  # nprobe sweep + 2 beams x 2 + the default
    assert methods[-5:] == ["seater", "seater/decoder", "seater", "seater/decoder", "seater"]
    ivf = [p for p in out["points"] if p["method"] == "ivf"]
    assert ivf[-1]["candidates"] == 500  # nprobe = nlist scores the whole catalogue
    (summary,) = out["summary"]
    assert summary["default"] and summary["setting"] == f"beam={beam}"
    assert summary["sasrec_exhaustive_recall"] == ivf[-1]["recall"]
    assert summary["candidates"] == pytest.approx(beam)  # k=20 + history fits in the default beam here
