"""The torch backend of a bundle: safetensors + module specs, rebuilt and served on every device.

Parametrised over the devices present: ``cpu``, plus ``cuda`` when ``torch.cuda.is_available()``
(:mod:`tests.devices`; ``GENRET_TEST_DEVICES=cpu,cuda`` names them explicitly; naming an absent one fails, so a GPU
check cannot pass by silently running on the CPU). The reference is ONNX Runtime on the CPU.

Tolerances (:func:`assert_parity`): on ``cpu`` ``atol=rtol=1e-4`` elementwise (float32), as in
test_onnx_parity.py: the same graph computed by two runtimes differs by summation order
(observed ~1e-6). On ``cuda`` the bound is a relative norm, ``|a-b| / |b| <= 1e-3``: cuBLAS and
the fused attention / Transformer-layer kernels may use TF32 or reduced-precision paths and other
reduction orders, and an H200 run measured elementwise gaps up to 5e-4 absolute (5e-3 relative
on values near 0) while every retrieved item matched. Items must still be equal on every device.
A wrong mask or a dropped layer moves outputs by O(0.1), far above both bounds.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from benchmarks.synthetic_bundle import make_synthetic_bundle
from models.bundle.backend import OnnxBackend
from models.bundle.bundle import load_bundle
from models.bundle.manifest import BundleError, bundle_fingerprint, file_sha256
from models.bundle.torch_backend import build_modules, describe_modules, torch_backend
from models.index import TreeIndex
from models.nets.decoder import NodeScorer, TokenDecoder
from models.nets.encoder import QueryEncoder
from models.search.retriever import Retriever
from tests.devices import DEVICES, require
from training.export.torch_files import TorchExportError, choose_backends

from .conftest import DIM, MAX_HISTORY, NUM_ITEMS, TinyModel

ATOL = RTOL = 1e-4
CUDA_REL_NORM = 1e-3


def assert_parity(got: torch.Tensor | np.ndarray, want: torch.Tensor | np.ndarray, device: str) -> None:
    """``got`` (computed on ``device``) against the CPU reference ``want``: see the module docstring."""
    a = torch.as_tensor(np.asarray(got.cpu() if isinstance(got, torch.Tensor) else got), dtype=torch.float64)
    b = torch.as_tensor(
        np.asarray(want.cpu() if isinstance(want, torch.Tensor) else want), dtype=torch.float64
    )
    assert a.shape == b.shape and torch.equal(a.isfinite(), b.isfinite())
    if not device.startswith("cuda"):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
        return
    finite = b.isfinite()
    error = float((a[finite] - b[finite]).norm() / b[finite].norm().clamp(min=1e-12))
    assert error <= CUDA_REL_NORM, f"relative norm error {error:.2e} > {CUDA_REL_NORM:.0e} on {device}"


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return require(str(request.param))


def resign(path: Path) -> None:
    """Recompute sizes, checksums and fingerprint after editing a file (what a buggy exporter writes)."""
    manifest = json.loads((path / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        entry["sha256"], entry["bytes"] = file_sha256(path / name), (path / name).stat().st_size
    manifest["fingerprint"] = bundle_fingerprint({n: e["sha256"] for n, e in manifest["files"].items()})
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_export_writes_torch_files_listed_and_checksummed(tiny_bundle_dir: Path) -> None:
    bundle = load_bundle(tiny_bundle_dir)
    assert bundle.backends == ("onnx", "torch")
    assert {"modules.json", "weights.safetensors"} <= set(bundle.manifest.files)
    assert bundle.manifest["export"]["torch_roundtrip_max_abs_error"] == 0.0
    specs = json.loads((tiny_bundle_dir / "modules.json").read_text())
    assert specs["encoder"]["kind"] == "QueryEncoder" and specs["decoder"]["kind"] == "TokenDecoder"
    assert specs["encoder"]["config"]["dim"] == DIM and specs["encoder"]["config"]["max_len"] == MAX_HISTORY


def test_safetensors_round_trip_is_exact(tiny_bundle_dir: Path, tiny_model: TinyModel) -> None:
    tensors = load_file(str(tiny_bundle_dir / "weights.safetensors"))
    want = {f"encoder.{k}": v for k, v in tiny_model.encoder.state_dict().items()}
    want |= {f"decoder.{k}": v for k, v in tiny_model.decoder.state_dict().items()}
    assert set(tensors) == set(want)
    for name, value in want.items():
        assert torch.equal(tensors[name], value), name
    encoder, decoder = build_modules(tiny_bundle_dir, tiny_model.index)
    assert isinstance(decoder, TokenDecoder) and not encoder.training and not decoder.training
    for key, value in decoder.state_dict().items():
        assert torch.equal(value, tiny_model.decoder.state_dict()[key]), key
    assert torch.equal(decoder.node_row, tiny_model.decoder.node_row)  # rebuilt from the bundle's index


def random_step(index: TreeIndex, batch: int, beams: int, prefix_len: int, seed: int) -> dict:
    """A decoder step as the search makes it: beams grouped by query, ``prefix[:, s]`` a node of
    level ``s``, candidates nodes of level ``S`` (some padded)."""
    g = torch.Generator().manual_seed(seed)
    history = torch.randint(1, NUM_ITEMS + 1, (batch, MAX_HISTORY), generator=g)  # [B, T]
    mask = torch.ones(batch, MAX_HISTORY, dtype=torch.bool)
    mask[0, :3] = False  # a left-padded row
    lo, Bb, C = index.level_offsets, batch * beams, index.max_branching
    prefix = torch.stack(
        [torch.randint(int(lo[s]), int(lo[s + 1]), (Bb,), generator=g) for s in range(prefix_len)], dim=1
    )  # [Bb, S]
    candidates = torch.randint(int(lo[prefix_len]), int(lo[prefix_len + 1]), (Bb, C), generator=g)  # [Bb, C]
    candidates[::2, C // 2 :] = -1
    return {
        "history": history.masked_fill(~mask, 0),
        "mask": mask,
        "beam_query": torch.arange(batch).repeat_interleave(beams),  # [Bb]
        "prefix": prefix,
        "candidates": candidates,
    }


@pytest.mark.parametrize("prefix_len", [1, 2])
def test_torch_backend_on_device_matches_onnx_runtime(
    tiny_bundle_dir: Path, tiny_model: TinyModel, device: str, prefix_len: int
) -> None:
    bundle = load_bundle(tiny_bundle_dir)
    ort_backend = OnnxBackend.from_bundle(bundle, "cpu", intra_op_threads=1)
    backend = torch_backend(bundle, device)
    step = random_step(tiny_model.index, 3, 4, prefix_len, seed=7)
    ref_memory, ref_query = ort_backend.encode(step["history"], step["mask"])
    memory, query = backend.encode(step["history"].to(device), step["mask"].to(device))
    assert memory.device.type == torch.device(device).type
    assert_parity(memory, ref_memory, device)
    assert_parity(query, ref_query, device)
    names = ("beam_query", "prefix", "candidates")
    ref = ort_backend.score(ref_memory, step["mask"], *(step[n] for n in names))
    got = backend.score(memory, step["mask"].to(device), *(step[n].to(device) for n in names))
    assert_parity(got, ref, device)


def test_retriever_with_torch_backend_on_device_matches_onnx(tiny_bundle_dir: Path, device: str) -> None:
    bundle = load_bundle(tiny_bundle_dir)
    reference = Retriever(bundle, "cpu", "onnx", intra_op_threads=1)
    served = Retriever(bundle, device, "torch")
    assert served.backend.name == "torch" and device.split(":")[0] in served.device_info
    rng = np.random.default_rng(3)
    histories = [rng.integers(1, NUM_ITEMS + 1, size=n) for n in (1, 4, MAX_HISTORY, 9)]
    want = reference.retrieve(histories, k=8, beam_size=5, exclude_history=True)
    got = served.retrieve(histories, k=8, beam_size=5, exclude_history=True)
    np.testing.assert_array_equal(got.items, want.items)
    assert_parity(got.scores, want.scores, device)


@pytest.mark.parametrize("device_name", [d for d in DEVICES if d.startswith("cuda")])
def test_cuda_graphs_match_eager_retrieval(tiny_bundle_dir: Path, device_name: str) -> None:
    """The captured static-shape search (models.search.graphs) returns what the eager path does:
    several batch sizes (padded to buckets), exclusions, a k above the candidates of a row."""
    bundle = load_bundle(tiny_bundle_dir)
    eager = Retriever(bundle, device_name, "torch")
    graphed = Retriever(bundle, device_name, "torch", cuda_graphs=True)
    assert graphed.graphs is not None
    rng = np.random.default_rng(5)
    for sizes, k, beam in (((1,), 8, 5), ((1, 4, MAX_HISTORY, 9, 2), 8, 5), ((3, 3, 3), 30, 2)):
        histories = [rng.integers(1, NUM_ITEMS + 1, size=n) for n in sizes]
        for _ in range(2):  # capture, then replay
            want = eager.retrieve(histories, k=k, beam_size=beam, exclude_history=True)
            got = graphed.retrieve(histories, k=k, beam_size=beam, exclude_history=True)
            assert graphed.graphs.disabled is None, graphed.graphs.disabled
            np.testing.assert_array_equal(got.items, want.items)
            np.testing.assert_array_equal(got.leaves, want.leaves)
            np.testing.assert_array_equal(got.num_candidates, want.num_candidates)
            np.testing.assert_array_equal(got.num_scored, want.num_scored)
            assert_parity(got.scores, want.scores, device_name)
    assert len(graphed.graphs.graphs) == 3


@pytest.mark.parametrize("device_name", [d for d in DEVICES if d.startswith("cuda")])
def test_cuda_graphs_survive_catalogue_versions(tiny_bundle_dir: Path, device_name: str) -> None:
    """A catalogue version gets its own graphs, captured in ``with_catalogue`` (before it serves) for
    every shape the serving runner held, and they answer as that version's eager path does."""
    from .test_graph_search import grown_versions

    bundle = load_bundle(tiny_bundle_dir)
    graphed = Retriever(bundle, device_name, "torch", cuda_graphs=True)
    eager = Retriever(bundle, device_name, "torch", cuda_graphs=False)
    rng = np.random.default_rng(6)
    histories = [rng.integers(1, NUM_ITEMS + 1, size=n) for n in (1, 4, MAX_HISTORY)]
    graphed.retrieve(histories, k=8, beam_size=5, exclude_history=True)  # one shape captured on version 0
    assert graphed.graphs is not None and len(graphed.graphs.graphs) == 1
    for cat in grown_versions(bundle):
        served, reference = graphed.with_catalogue(cat), eager.with_catalogue(cat)
        assert served.graphs is not None and len(served.graphs.graphs) == 1  # captured before serving
        got = served.retrieve(histories, k=8, beam_size=5, exclude_history=True)
        want = reference.retrieve(histories, k=8, beam_size=5, exclude_history=True)
        assert served.graphs.disabled is None, served.graphs.disabled
        np.testing.assert_array_equal(got.items, want.items)
        np.testing.assert_array_equal(got.leaves, want.leaves)
        assert_parity(got.scores, want.scores, device_name)


@pytest.mark.parametrize("device_name", [d for d in DEVICES if d.startswith("cuda")])
def test_cuda_graphs_from_encoder_states_match_eager_search(tiny_bundle_dir: Path, device_name: str) -> None:
    """The service's graphed path (GraphRunner.search: encoder states in static shapes, captured,
    the dense fill after the replay) answers what Retriever.search does with the same states."""
    from models.search.graph_runner import GraphRunner

    bundle = load_bundle(tiny_bundle_dir)
    retriever = Retriever(bundle, device_name, "torch", cuda_graphs=False)
    runner = GraphRunner(retriever)
    rng = np.random.default_rng(8)
    for sizes, k, beam in (((1, 4, MAX_HISTORY), 8, 2), ((3, 3, 3, 1, 2), 12, 1)):
        histories = [rng.integers(1, NUM_ITEMS + 1, size=n) for n in sizes]
        states = retriever.encode(histories)
        exclude = [np.asarray(h) for h in histories]
        for _ in range(2):  # capture, then replay
            got = runner.search(states, k, beam, exclude, fill=True)
            want = retriever.search(states, k, beam, exclude, fill=True)
            assert got is not None and runner.disabled is None, runner.disabled
            np.testing.assert_array_equal(got.items, want.items)
            np.testing.assert_array_equal(got.dense_filled, want.dense_filled)
            assert_parity(got.scores, want.scores, device_name)
    assert len(runner.graphs) == 2


def test_torch_only_bundle_serves_and_refuses_onnx(tmp_path: Path, device: str) -> None:
    path = make_synthetic_bundle(tmp_path / "synthetic", 3000, 8, 3, dim=16, backends=("torch",))
    assert sorted(p.name for p in path.iterdir()) == [
        "index.npz",
        "items.npz",
        "manifest.json",
        "modules.json",
        "weights.safetensors",
    ]
    bundle = load_bundle(path)
    assert bundle.backends == ("torch",) and bundle.item_ids[1] == "item0001"
    retriever = Retriever(bundle, device, "torch")
    result = retriever.retrieve([np.array([1, 2, 3]), np.array([2999])], k=10, beam_size=4)
    assert result.items.shape == (2, 10) and (result.items > 0).all()
    assert all(len(set(row)) == 10 for row in result.items.tolist())
    with pytest.raises(BundleError, match="holds no onnx files"):
        Retriever(bundle, "cpu", "onnx")


def copy_bundle(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(src, dst)
    return dst


def test_bad_torch_files_are_refused(tiny_bundle_dir: Path, tiny_model: TinyModel, tmp_path: Path) -> None:
    index = tiny_model.index
    path = copy_bundle(tiny_bundle_dir, tmp_path)
    (path / "weights.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(BundleError, match=r"weights\.safetensors has 16 bytes"):
        load_bundle(path)  # replaced without re-signing: the checksum catches it

    tensors = load_file(str(tiny_bundle_dir / "weights.safetensors"))
    cases = {
        "missing tensor": ({k: v for k, v in tensors.items() if "output_norm" not in k}, "Missing key"),
        "wrong shape": ({**tensors, "decoder.bias": torch.zeros(3)}, "size mismatch"),
        "stray tensor": ({**tensors, "ranker.w": torch.zeros(1)}, "neither encoder nor decoder"),
    }
    for name, (bad, message) in cases.items():
        path = copy_bundle(tiny_bundle_dir, tmp_path / name.replace(" ", "_"))
        save_file(bad, str(path / "weights.safetensors"))
        resign(path)
        with pytest.raises(BundleError, match=message):
            torch_backend(load_bundle(path))

    specs = json.loads((tiny_bundle_dir / "modules.json").read_text())
    for name, spec_edit, message in (
        ("unknown kind", {"encoder": {**specs["encoder"], "kind": "os.system"}}, "unknown kind 'os.system'"),
        ("new version", {"spec_version": 99}, "spec_version 99"),
        (
            "config key",
            {"encoder": {**specs["encoder"], "config": {"dims": 3}}},
            "does not fit EncoderConfig",
        ),
        (  # 10**12 rows x 16 floats: built on the meta device, refused before anything is allocated
            "huge table",
            {
                "encoder": {
                    **specs["encoder"],
                    "item_embedding": {**specs["encoder"]["item_embedding"], "num_embeddings": 10**12},
                }
            },
            "size mismatch",
        ),
    ):
        path = copy_bundle(tiny_bundle_dir, tmp_path / name.replace(" ", "_"))
        (path / "modules.json").write_text(json.dumps({**specs, **spec_edit}))
        resign(path)
        with pytest.raises(BundleError, match=message):
            build_modules(load_bundle(path).path, index)


def test_manifest_must_list_exactly_its_backends_files(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    path = copy_bundle(tiny_bundle_dir, tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "backends": ["onnx"]}))
    with pytest.raises(BundleError, match=r"files lists \['modules.json', 'weights.safetensors'\]"):
        load_bundle(path)
    (path / "manifest.json").write_text(json.dumps({**manifest, "backends": ["tensorrt"]}))
    with pytest.raises(BundleError, match="backends must be"):
        load_bundle(path)


def test_only_known_module_kinds_get_torch_files(tiny_model: TinyModel) -> None:
    class CustomEncoder(QueryEncoder):  # a subclass may override embed_items: not rebuildable
        pass

    index = tiny_model.index
    custom = CustomEncoder(replace(tiny_model.encoder.config))
    assert choose_backends(tiny_model.encoder, tiny_model.decoder, index, None) == ("onnx", "torch")
    assert choose_backends(custom, tiny_model.decoder, index, None) == ("onnx",)
    with pytest.raises(TorchExportError, match="CustomEncoder"):
        choose_backends(custom, tiny_model.decoder, index, ("torch",))
    scorer = NodeScorer(DIM, index.num_nodes, hidden=8)
    specs = describe_modules(tiny_model.encoder, scorer, index)
    assert specs is not None and specs["decoder"] == {
        "kind": "NodeScorer",
        "dim": DIM,
        "num_nodes": index.num_nodes,
        "hidden": 8,
    }
