from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.main import main


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GENRET_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_compare_prints_one_row_per_method_as_json(tmp_path: Path, cache: Path, capsys) -> None:
    argv = ["compare", "--data", "synthetic", "--methods", "popular,sasrec", "--max-epochs", "2"]
    assert main([*argv, "--json", "--workdir", str(tmp_path / "wd"), "--seed", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in out["results"]] == ["popular", "sasrec"]
    assert out["split"]["kind"] == "user" and out["seed"] == 1 and out["dataset"]["users"] == 2000
    for r in out["results"]:
        assert set(r["metrics"]) >= {"recall@10", "ndcg@20", "hr@50"}
        assert r["train_seconds"] >= 0 and r["eval_seconds"] >= 0
    assert list(cache.glob("sasrec/*/model.safetensors"))


def test_compare_table_and_loo_split(tmp_path: Path, cache: Path, capsys) -> None:
    assert (
        main(
            [
                "compare",
                "--data",
                "synthetic",
                "--methods",
                "popular",
                "--split",
                "loo",
                "--workdir",
                str(tmp_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "split loo, seed 0" in out and "every earlier item excluded" in out
    assert all(f"{m}@{k}" in out for m in ("recall", "ndcg") for k in (5, 10, 20)) and "@50" not in out
    assert any(line.startswith("popular ") for line in out.splitlines())


def test_compare_loo_json_reports_the_literature_cut_offs(tmp_path: Path, cache: Path, capsys) -> None:
    argv = ["compare", "--data", "synthetic", "--methods", "popular,sasrec", "--split", "loo"]
    assert main([*argv, "--max-epochs", "1", "--json", "--workdir", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["split"]["ks"] == [5, 10, 20] and 0.0 <= out["split"]["test_targets_in_history"] < 1.0
    for r in out["results"]:
        assert set(r["metrics"]) == {f"{m}@{k}" for m in ("recall", "ndcg", "hr") for k in (5, 10, 20)}


def test_compare_rejects_an_unknown_method(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(KeyError, match="unknown method 'nope'"):
        main(["compare", "--data", "synthetic", "--methods", "nope", "--workdir", str(tmp_path)])


def test_train_writes_sasrec_weights_to_out(tmp_path: Path, cache: Path, capsys) -> None:
    out_dir = tmp_path / "out"
    argv = [
        "train",
        "--method",
        "sasrec",
        "--data",
        "synthetic",
        "--out",
        str(out_dir),
        "--workdir",
        str(tmp_path),
    ]
    assert main([*argv, "--set", "sasrec.max_epochs=1", "--set", "sasrec.dim=16"]) == 0
    printed = capsys.readouterr().out
    assert "recall" in printed and (out_dir / "model.safetensors").is_file()
    with pytest.raises(SystemExit, match="exists"):
        main(argv)


def test_data_stats_and_a_malformed_file(tmp_path: Path, capsys) -> None:
    path = tmp_path / "d.txt"
    path.write_text("1 1 2 3\n2\n3 2 3\n")
    with pytest.raises(SystemExit, match=r"d\.txt:2"):
        main(["data", "stats", "--data", str(path), "--format", "seq"])
    assert main(["data", "stats", "--data", str(path), "--format", "seq", "--skip-bad-lines", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["users"], stats["items"], stats["interactions"], stats["skipped_lines"]) == (2, 3, 5, 1)
