"""training.distributed and `genret train` under torchrun: two real CPU processes over gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from models.bundle.bundle import load_bundle
from training import distributed
from training.bundle_recommender import BundleRecommender
from training.data import synthetic_dataset
from training.distributed import DistContext
from training.evaluation import evaluate_recommender
from training.methods.popular import Popularity
from training.methods.sasrec.cache import sasrec_cache_key
from training.methods.sasrec.model import SASRec, SASRecConfig
from training.metrics import DEFAULT_KS
from training.splits import make_split

REPO = Path(__file__).resolve().parents[3]
TORCHRUN_TIMEOUT_S = 300  # a hung rendezvous fails the test instead of the whole suite
CLI = ["-m", "cli"]  # what the k8s trainer Job runs under torchrun


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node N <args>`` in the repository."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S, check=False
    )


def test_from_env_reads_torchrun_variables() -> None:
    assert DistContext.from_env({}) == DistContext(rank=0, world_size=1, local_rank=0)
    ctx = DistContext.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.local_world_size) == (3, 4, 1, 2)
    assert not ctx.is_main and ctx.is_distributed
    with pytest.raises(ValueError, match="rank=4 world_size=4"):
        DistContext.from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="must be integers"):
        DistContext.from_env({"RANK": "zero", "WORLD_SIZE": "2"})


def test_single_process_is_a_no_op() -> None:
    single = DistContext()
    rows = np.arange(10).reshape(5, 2)
    assert single.shard(rows) is rows and single.shard(["a", "b"]) == ["a", "b"]
    module = torch.nn.Linear(2, 2)
    assert single.wrap(module) is module
    value = torch.tensor([1.0, 2.0])
    assert single.all_reduce_mean(value) is value
    assert single.broadcast({"stop": True}) == {"stop": True}
    single.barrier()
    assert distributed.current() == distributed.SINGLE
    with distributed.activate(single) as active:
        assert distributed.current() is active
    assert distributed.current() == distributed.SINGLE


def test_collectives_need_init() -> None:
    with pytest.raises(RuntimeError, match="call init"):
        DistContext(rank=0, world_size=2).broadcast(1)


@given(n=st.integers(min_value=4, max_value=200), world_size=st.integers(min_value=1, max_value=4))
def test_shards_are_equal_sized_and_cover_every_row(n: int, world_size: int) -> None:
    shards = [DistContext(rank=r, world_size=world_size).shard_indices(n) for r in range(world_size)]
    assert len({len(s) for s in shards}) == 1  # the same number of steps on every rank
    taken = np.concatenate(shards)
    assert set(taken.tolist()) == set(range(n))
    assert len(taken) - n < world_size  # padding wraps at most world_size - 1 rows
    names = [str(i) for i in range(n)]
    assert DistContext(rank=world_size - 1, world_size=world_size).shard(names) == [
        names[i] for i in shards[-1]
    ]


def test_world_size_joins_the_cache_key_only_above_one() -> None:
    ds = synthetic_dataset(num_users=50, num_items=40)
    split = make_split(ds, kind="user", seed=0, max_len=10)
    config = SASRecConfig()
    one = sasrec_cache_key(ds.fingerprint(), split, 0, config)
    assert sasrec_cache_key(ds.fingerprint(), split, 0, config, world_size=1) == one
    assert sasrec_cache_key(ds.fingerprint(), split, 0, config, world_size=2) != one


WORKER = """
import torch
from training.distributed import DistContext, activate, current

with activate(DistContext.from_env()) as dist:
    assert current() is dist and dist.world_size == 2
    mean = dist.all_reduce_mean(torch.tensor([float(dist.rank), 10.0]))
    assert mean.tolist() == [0.5, 10.0], mean
    assert dist.broadcast({"from": dist.rank}) == {"from": 0}
    assert dist.shard(list(range(5))) == ([0, 2, 4] if dist.rank == 0 else [1, 3, 0])
    torch.manual_seed(dist.rank)  # different weights: DDP must start every rank from rank 0's
    module = torch.nn.Linear(3, 1, bias=False)
    net = dist.wrap(module)
    x = torch.full((1, 3), float(dist.rank + 1))
    net(x).sum().backward()  # local gradient = x; DDP averages: (1 + 2) / 2
    assert module.weight.grad is not None and module.weight.grad.tolist() == [[1.5, 1.5, 1.5]]
    weights = [torch.zeros(1, 3), torch.zeros(1, 3)] if dist.is_main else None
    torch.distributed.gather(module.weight.detach(), weights, dst=0)
    if dist.is_main:
        assert weights is not None and torch.equal(weights[0], weights[1])
    dist.barrier()
    print(f"rank {dist.rank} ok")
"""


def test_collectives_and_ddp_across_two_processes(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    proc = torchrun([str(script)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "rank 0 ok" in proc.stdout and "rank 1 ok" in proc.stdout


SETTINGS = {  # tiny: a 32-d SASRec for 6 epochs, SEATER for 2 epochs over an 8-ary tree
    "sasrec.max_epochs": 6,
    "sasrec.dim": 32,
    "sasrec.batch_size": 64,
    "sasrec.dropout": 0.1,
    "dim": 32,
    "epochs": 2,
    "batch_size": 64,
    "branching": 8,
    "beam_size": 32,
}


def test_genret_train_seater_under_torchrun_writes_a_serving_bundle(tmp_path: Path) -> None:
    """SASRec then SEATER data-parallel on two ranks; rank 0 writes the cache and the bundle."""
    out, cache = tmp_path / "seater", tmp_path / "cache"
    proc = torchrun(
        [
            *CLI,
            "train",
            "--method",
            "seater",
            "--data",
            "synthetic",
            "--max-len",
            "20",
            *(f"--set={k}={v}" for k, v in SETTINGS.items()),
            f"--set=cache_dir={cache}",
            "--workdir",
            str(tmp_path / "work"),
            "--out",
            str(out),
            "--json",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)  # one JSON document: only rank 0 prints
    assert report["out"] == str(out) and report["info"]["world_size"] == 2
    assert "on rank 1 of 2" in proc.stderr  # SASRec trained on both ranks' shards
    (cached,) = (cache / "sasrec").iterdir()  # written once, by rank 0
    assert SASRec.load(cached).info["world_size"] == 2

    bundle = load_bundle(out)
    assert bundle.manifest.metrics == pytest.approx(report["metrics"])  # `genret train` records them
    split = make_split(synthetic_dataset(), kind="user", seed=0, max_len=20)  # what --data synthetic reads
    # served from --out as `genret train` evaluates it (the config's beam, widened for k and exclusions)
    served = BundleRecommender(out, int(SETTINGS["beam_size"]))
    seater = evaluate_recommender(served, split.test, DEFAULT_KS)
    popular = evaluate_recommender(Popularity.fit(split), split.test, (20,))
    assert seater["recall@20"] == pytest.approx(report["metrics"]["recall@20"])
    assert seater["recall@20"] > 2 * popular["recall@20"], (seater, popular)


def test_genret_train_non_parallel_method_runs_on_rank_zero_only(tmp_path: Path) -> None:
    work = str(tmp_path / "work")
    proc = torchrun(
        [
            *CLI,
            "train",
            "--method",
            "popular",
            "--data",
            "synthetic",
            "--workdir",
            work,
            "--json",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(proc.stdout)["method"] == "popular"
    assert "rank 0 of 2 trains it alone" in proc.stderr
