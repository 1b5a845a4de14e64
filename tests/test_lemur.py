"""LEMUR through the runtime: export, embed and score parity with PyTorch, the missing-id policy,
bad input at the C boundary, family dispatch, and the generic stage call on a plain ONNX model."""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import slimengine as se
from slimengine import _native
from slimengine.export.checkpoint import load_lemur_checkpoint
from tests.conftest import bank_address

from .conftest import edit_manifest, relative_error, run_cli

TOLERANCE = 1e-5  # fp32 relative error, runtime vs PyTorch (the bound)


@pytest.fixture(scope="module")
def model(lemur_checkpoint):
    return load_lemur_checkpoint(lemur_checkpoint).build_model()


@pytest.fixture(scope="module")
def engine(lemur_bundle):
    with se.open_engine(lemur_bundle) as e:
        yield e


def documents(config: dict, batch: int, text_len: int, frames: int, seed: int):
    rng = np.random.default_rng(seed)
    text_ids = rng.integers(1, config["vocab_size"], (batch, text_len))
    text_ids[0, text_len // 2 :] = 0  # padding
    if batch > 2:
        text_ids[2, :] = 0  # a document with no text at all
    segment_ids = rng.integers(0, config["num_segments"], (batch, text_len))
    pixels = rng.standard_normal((batch, frames, 3, config["image_size"], config["image_size"]), dtype=np.float32)
    return text_ids, segment_ids, pixels


def torch_embed(model, text_ids, segment_ids, frames) -> np.ndarray:
    with torch.no_grad():
        return model.embed(torch.from_numpy(text_ids), torch.from_numpy(segment_ids), torch.from_numpy(frames)).numpy()


def torch_score(model, history: np.ndarray, mask: np.ndarray, query_ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.score(torch.from_numpy(history), torch.from_numpy(mask), torch.from_numpy(query_ids)).numpy()


def test_export_detects_the_family_and_writes_embed_and_score(lemur_bundle):
    manifest = json.loads((lemur_bundle / "manifest.json").read_text())
    assert manifest["family"] == "lemur" and manifest["program"]["programs"] == ["embed", "score"]
    assert manifest["program"]["model_version"] == 7
    stages = {s["name"]: s for s in manifest["stages"]}
    assert set(stages) == {"embed", "score"}
    assert stages["embed"]["inputs"][0] == {"name": "text_ids", "dtype": "int64", "shape": ["batch", "text"]}
    assert stages["embed"]["inputs"][2]["shape"][:2] == ["batch", "frames"]
    assert stages["score"]["inputs"][0]["shape"][:2] == ["batch", "history"]
    assert set(manifest["files"]) >= {"stages/embed.onnx", "stages/score.onnx"}
    log = lemur_bundle.with_suffix(".log").read_text()
    assert "verify  embed" in log and "verify  score" in log


def test_embed_matches_pytorch_for_any_batch_text_length_and_frame_count(engine, model):
    session = engine.session()
    c = engine.config
    for batch, text_len, frames in [(1, 1, 1), (3, 17, 2), (5, c["max_text_len"], c["max_frames"])]:
        text_ids, segment_ids, pixels = documents(c, batch, text_len, frames, seed=batch)
        result = session.embed(text_ids, pixels, segment_ids=segment_ids)
        expected = torch_embed(model, text_ids, segment_ids, pixels)
        err = relative_error(result.embeddings, expected)
        print(f"embed B={batch} L={text_len} F={frames}: relative error {err:.2e}")
        assert err <= TOLERANCE
        assert np.allclose(np.linalg.norm(result.embeddings, axis=1), 1.0, atol=1e-5)
    # segment_ids omitted means every token is in segment 0 (title)
    text_ids, segment_ids, pixels = documents(c, 2, 6, 1, seed=9)
    err = relative_error(session.embed(text_ids, pixels).embeddings, torch_embed(model, text_ids, np.zeros_like(segment_ids), pixels))
    assert err <= TOLERANCE


def test_score_assembles_histories_from_the_bank_and_matches_pytorch(engine, model, tmp_path):
    c = engine.config
    session = engine.session()
    bank = se.MemoryBank(tmp_path / "docs.bank", c["embed_dim"])
    text_ids, segment_ids, pixels = documents(c, 40, 12, 2, seed=1)
    doc_ids = np.arange(1000, 1040)
    session.embed(text_ids, pixels, segment_ids=segment_ids, bank=bank, document_ids=doc_ids)
    assert len(bank) == 40
    stored = bank.lookup(doc_ids)
    assert stored.found.all() and (stored.model_versions == 7).all()  # the bundle's model version
    reference = torch_embed(model, text_ids, segment_ids, pixels)  # PyTorch's own embeddings, not the runtime's
    by_id = dict(zip(doc_ids.tolist(), reference))

    rng = np.random.default_rng(2)
    for batch, length in [(1, 1), (4, 9), (2, 256)]:
        history_ids = rng.choice(doc_ids, (batch, length))
        history_ids[0, length // 2 :] = -1  # padding
        query_ids = rng.integers(1, c["vocab_size"], (batch, 5))
        query_ids[-1, 3:] = 0
        result = session.score(bank, history_ids, query_ids)
        history = np.stack([[by_id.get(i, np.zeros(c["embed_dim"], np.float32)) for i in row] for row in history_ids])
        expected = torch_score(model, history.astype(np.float32), (history_ids >= 0).astype(np.float32), query_ids)
        err = relative_error(result.scores, expected)
        print(f"score B={batch} H={length}: relative error {err:.2e}, {result.stats}")
        assert err <= TOLERANCE
        assert result.stats["history_found"] == int((history_ids >= 0).sum()) and result.stats["history_missing"] == 0
        assert ((result.scores > 0) & (result.scores < 1)).all()

    # an empty history (all padding) still scores: the query attends to the learned empty slot
    empty = session.score(bank, np.full((1, 4), -1), query_ids[:1])
    assert relative_error(empty.scores, torch_score(model, np.zeros((1, 4, c["embed_dim"]), np.float32), np.zeros((1, 4), np.float32),
                                                    query_ids[:1])) <= TOLERANCE


def test_missing_and_stale_ids_follow_the_documented_policy(engine, model, tmp_path):
    c = engine.config
    session = engine.session()
    bank = se.MemoryBank(tmp_path / "policy.bank", c["embed_dim"])
    rng = np.random.default_rng(4)
    vectors = rng.standard_normal((3, c["embed_dim"]), dtype=np.float32)
    bank.upsert([1, 2], vectors[:2], model_version=7)
    bank.upsert([3], vectors[2:], model_version=5)  # written by an older model
    query = rng.integers(1, c["vocab_size"], (1, 4))

    with pytest.raises(se.SlimError) as err:  # default: an error naming the first missing id
        session.score(bank, [[1, 42, 2]], query)
    assert err.value.status == "SLIM_ERR_NOT_FOUND" and "history_ids[0,1] = 42 is not in the memory bank" in str(err.value)

    skipped = session.score(bank, [[1, 42, 2]], query, skip_missing=True)  # SKIP: left out exactly like padding
    expected = torch_score(model, np.stack([[vectors[0], np.zeros_like(vectors[0]), vectors[1]]]), np.array([[1, 0, 1]], np.float32), query)
    assert relative_error(skipped.scores, expected) <= TOLERANCE
    assert skipped.stats["history_missing"] == 1 and skipped.stats["history_found"] == 2

    assert session.score(bank, [[1, 3]], query).stats["history_found"] == 2  # every version accepted by default
    with pytest.raises(se.SlimError) as err:
        session.score(bank, [[1, 3]], query, min_model_version=7)
    assert err.value.status == "SLIM_ERR_NOT_FOUND" and "model version 5" in str(err.value)
    stale = session.score(bank, [[1, 3]], query, min_model_version=7, skip_missing=True)
    assert stale.stats["history_missing"] == 1


class RawLemurCall:
    """slim_embed / slim_score through raw ctypes, so that nothing in Python pre-validates arguments."""

    def __init__(self, engine):
        self.lib = _native.lib()
        self.session = engine.session()
        self.keep = []

    def tensor(self, arr, dtype=None, shape=None):
        dtype = {np.dtype(np.float32): 0, np.dtype(np.int64): 3, np.dtype(np.int32): 4}[arr.dtype] if dtype is None else dtype
        shape = arr.shape if shape is None else shape
        dims = (ctypes.c_int64 * len(shape))(*shape)
        t = _native.SlimTensor(arr.ctypes.data, dtype, 1, 0, len(shape), dims, None)
        self.keep += [arr, dims, t]
        return ctypes.pointer(t)

    def status(self, code):
        return self.lib.slim_status_name(code).decode(), self.lib.slim_last_error().decode()

    def embed(self, text, frames, out, bank=None, document_ids=None):
        p = _native.params(_native.EmbedParams)
        p.text_ids, p.frames = self.tensor(text) if isinstance(text, np.ndarray) else text, self.tensor(frames)
        if bank is not None:
            p.bank, p.document_ids = bank_address(bank), self.tensor(document_ids)
        return self.status(self.lib.slim_embed(self.session._handle, ctypes.byref(p), self.tensor(out), None))


def test_bad_embed_and_score_input_gets_clear_errors_and_changes_nothing(engine, tmp_path):
    c = engine.config
    call = RawLemurCall(engine)
    bank = se.MemoryBank(tmp_path / "bad.bank", c["embed_dim"])
    bank.upsert([5], np.ones((1, c["embed_dim"]), np.float32) / c["embed_dim"] ** 0.5)
    size = bank.path.stat().st_size
    text, _, frames = documents(c, 2, 6, 1, seed=3)
    out = np.full((2, c["embed_dim"]), 7.0, np.float32)
    ids = np.array([8, 9])
    S = c["image_size"]
    cases = [
        (dict(text=text.astype(np.float32)), "SLIM_ERR_DTYPE", "text_ids: dtype must be int64"),
        (dict(text=np.where(text > 0, c["vocab_size"], 0)), "SLIM_ERR_INVALID_ARGUMENT", f"outside [0, {c['vocab_size']})"),
        (dict(frames=np.full((2, 1, 3, S, S), np.nan, np.float32)), "SLIM_ERR_NUMERICS", "frames contains NaN"),
        (dict(frames=np.zeros((2, 1, 3, S + 1, S), np.float32)), "SLIM_ERR_SHAPE", f"frames: shape [2,1,3,{S + 1},{S}]"),
        (dict(frames=np.zeros((2, c["max_frames"] + 1, 3, S, S), np.float32)), "SLIM_ERR_SHAPE", f"at most {c['max_frames']} frames"),
        (dict(out=np.zeros((2, c["embed_dim"] + 1), np.float32)), "SLIM_ERR_SHAPE", "embeddings_out"),
        (dict(document_ids=np.array([8, -3])), "SLIM_ERR_INVALID_ARGUMENT", "document_ids: element 1 is -3"),
        (dict(document_ids=np.array([8.0, 9.0], np.float32)), "SLIM_ERR_DTYPE", "document_ids: dtype must be int64"),
    ]
    for override, status, message in cases:
        args = dict(text=text, frames=frames, out=out, bank=bank, document_ids=ids) | override
        got = call.embed(**args)
        assert got[0] == status and message in got[1], (override.keys(), got)
        assert (out == 7.0).all() and len(bank) == 1 and bank.path.stat().st_size == size  # nothing changed

    # a bank of another width is refused before anything runs
    other = se.MemoryBank(tmp_path / "other.bank", c["embed_dim"] + 1)
    assert call.embed(text, frames, out, bank=other, document_ids=ids)[0] == "SLIM_ERR_SHAPE" and len(other) == 0
    session = engine.session()
    with pytest.raises(se.SlimError, match="holds 33-d embeddings but this model takes 32-d"):
        session.score(other, [[1]], [[1]])
    with pytest.raises(se.SlimError, match=r"history_ids \(-1 pads\): element 0 is -2"):
        session.score(bank, [[-2]], [[1]])
    with pytest.raises(se.SlimError, match="query_ids: shape"):
        session.score(bank, [[5], [5]], [[1]])
    with pytest.raises(TypeError, match="history_ids: dtype must be an integer type"):
        session.score(bank, [[5.0]], [[1]])
    with pytest.raises(se.SlimError, match="the engine's family is 'lemur'; slim_generate runs sd3 bundles"):
        session.generate(np.zeros((1, 2, 3), np.float32), np.zeros((1, 3), np.float32), latents=np.zeros((1, 4, 8, 8), np.float32))
    with pytest.raises(se.SlimError, match="the engine's family is 'lemur'; slim_generate runs sd3 bundles"):
        session.generate(np.zeros((1, 2, 3), np.float32), np.zeros((1, 3), np.float32))  # no KeyError from the SD3 config


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(family="lemurx"), "'lemurx' is not supported by this runtime (expected sd3 or lemur)"),
    (lambda m: m["config"].pop("embed_dim"), "config.embed_dim is missing"),
    (lambda m: m["program"].update(programs=["embed"]), "program.programs must offer \"embed\" and \"score\""),
    (lambda m: m["stages"][0]["inputs"][0].update(dtype="float32"), "stage embed inputs (text_ids, segment_ids, frames) must be int64"),
    (lambda m: m["stages"][1]["outputs"][0].update(dtype="int64"), "output 'score' is float32 in the graph but int64 in the manifest"),
    (lambda m: m["stages"].reverse() or m["stages"][0].update(name="embed"), "is not unique"),
])
def test_lemur_manifests_are_validated_by_family(lemur_bundle, tmp_path, edit, message):
    bundle = tmp_path / "copy.engine"
    shutil.copytree(lemur_bundle, bundle)
    edit_manifest(bundle, edit)  # re-signed, so the check reaches the field
    with pytest.raises(se.SlimError) as err:
        se.open_engine(bundle)
    assert err.value.status == "SLIM_ERR_BUNDLE" and message in str(err.value), str(err.value)


def test_pt_and_safetensors_checkpoints_load_the_same_model_without_running_code(tmp_path, lemur_checkpoint, model):
    from slimengine.export.checkpoint import checkpoint_family
    from slimengine.export.errors import CheckpointError
    from slimengine.tools.make_lemur_checkpoint import main as make_lemur_main

    pt = tmp_path / "same.pt"
    assert make_lemur_main(["-o", str(pt), "--preset", "tiny", "--seed", "3"]) == 0
    assert checkpoint_family(pt) == checkpoint_family(lemur_checkpoint) == "lemur"
    wrapped = tmp_path / "wrapped.pt"  # a training wrapper's prefix on every key
    saved = torch.load(pt, weights_only=True)
    torch.save({"state_dict": {"module." + k: v for k, v in saved["state_dict"].items()}, "slimengine": saved["slimengine"]}, wrapped)
    for path in (pt, wrapped):
        other = load_lemur_checkpoint(path).build_model()
        for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
            assert torch.equal(a, b), name
    no_config = tmp_path / "no-config.pt"
    torch.save({"state_dict": saved["state_dict"], "slimengine": {"family": "lemur"}}, no_config)
    with pytest.raises(CheckpointError, match="not a LEMUR checkpoint"):
        load_lemur_checkpoint(no_config)
    bad_config = tmp_path / "bad-config.pt"
    torch.save({"state_dict": saved["state_dict"], "slimengine": {"family": "lemur", "lemur_config": {"num_heads": 0}}}, bad_config)
    with pytest.raises(CheckpointError, match="invalid lemur_config .*num_heads must be a positive integer"):
        load_lemur_checkpoint(bad_config)


def test_export_cli_rejects_bad_lemur_requests_with_one_line(lemur_checkpoint, tmp_path):
    proc = run_cli("export-engine", str(lemur_checkpoint), "-o", str(tmp_path / "x.engine"), "--precision", "fp16", check=False)
    assert proc.returncode == 2 and "LEMUR bundles are fp32 or int8" in proc.stderr and not (tmp_path / "x.engine").exists()
    from safetensors.torch import load_file, save_file

    state = load_file(str(lemur_checkpoint))
    state["ctr.0.weight"] = state["ctr.0.weight"][:, :-1].contiguous()
    from safetensors import safe_open

    with safe_open(str(lemur_checkpoint), framework="pt") as f:
        metadata = f.metadata()
    broken = tmp_path / "broken.safetensors"
    save_file(state, str(broken), metadata=metadata)
    proc = run_cli("export-engine", str(broken), "-o", str(tmp_path / "y.engine"), check=False)
    assert proc.returncode == 2 and "'ctr.0.weight' has shape" in proc.stderr and not (tmp_path / "y.engine").exists()


class ExternalEmbedder(torch.nn.Module):
    """An embedding model exported elsewhere: mean-pooled token embeddings, projected and normalised."""

    def __init__(self, dim: int):
        super().__init__()
        torch.manual_seed(0)
        self.tokens = torch.nn.Embedding(100, 24)
        self.proj = torch.nn.Linear(24, dim)

    def forward(self, ids, weights):
        pooled = (self.tokens(ids) * weights[..., None]).sum(1)
        return torch.nn.functional.normalize(self.proj(pooled), dim=-1), pooled


def test_a_plain_onnx_model_runs_through_the_generic_stage_call_and_feeds_the_bank(tmp_path):
    dim = 16
    module = ExternalEmbedder(dim).eval()
    # (an output named "embedding" would collide with the value torch.onnx names after nn.Embedding's op)
    ids = torch.randint(0, 100, (3, 7))
    weights = torch.rand(3, 7)
    path = tmp_path / "embedder.onnx"
    batch, length = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("length", min=1, max=64)
    torch.onnx.export(module, (ids, weights), str(path), dynamo=True, input_names=["ids", "weights"], output_names=["vector", "pooled"],
                      dynamic_shapes=({0: batch, 1: length}, {0: batch, 1: length}), verbose=False)
    engine = se.open_engine(path)
    assert engine.stage_names == ["model"] and engine.manifest["family"] == "onnx"
    session = engine.session()
    ids2, weights2 = torch.randint(0, 100, (5, 11)), torch.rand(5, 11)
    out = session.run_stage("model", {"weights": weights2.numpy(), "ids": ids2.numpy()}, {"vector": np.empty((5, dim), np.float32)})
    with torch.no_grad():
        expected = module(ids2, weights2)[0].numpy()
    err = relative_error(out["vector"], expected)
    print(f"plain ONNX embedder: relative error {err:.2e}")
    assert err <= TOLERANCE

    bank = se.MemoryBank(tmp_path / "ext.bank", dim)  # the same bank the LEMUR programs use
    bank.upsert(np.arange(5), out["vector"])
    assert np.array_equal(bank.lookup(np.arange(5)).embeddings, out["vector"])

    good = {"ids": ids2.numpy(), "weights": weights2.numpy()}
    bad_cases = [
        (dict(good, weights=weights2.numpy()[:, :3]), {"vector": np.empty((5, dim), np.float32)}, "SLIM_ERR_BACKEND", "stage model"),
        ({"ids": ids2.numpy()}, {"vector": np.empty((5, dim), np.float32)}, "SLIM_ERR_INVALID_ARGUMENT", "takes 2 inputs, got 1"),
        (dict(good, ids=ids2.numpy().astype(np.int32)), {"vector": np.empty((5, dim), np.float32)}, "SLIM_ERR_DTYPE", "input 'ids'"),
        (good, {"vectors": np.empty((5, dim), np.float32)}, "SLIM_ERR_INVALID_ARGUMENT", "output 'vectors' is not a graph output"),
        (good, {"vector": np.empty((5, dim + 1), np.float32)}, "SLIM_ERR_SHAPE", "output 'vector': shape [5,17], expected [?,16]"),
        (good, {"vector": np.empty((6, dim), np.float32)}, "SLIM_ERR_SHAPE", "has shape [5,16], but the caller's tensor is [6,16]"),
        (dict(good, weights=np.full((5, 11), np.nan, np.float32)), {"vector": np.empty((5, dim), np.float32)}, "SLIM_ERR_NUMERICS", "NaN"),
    ]
    for inputs, outputs, status, message in bad_cases:
        with pytest.raises(se.SlimError) as err:
            session.run_stage("model", inputs, outputs)
        assert err.value.status == status and message in str(err.value), str(err.value)
    with pytest.raises(se.SlimError, match="no stage named 'embed'"):
        session.run_stage("embed", good, {"vector": np.empty((5, dim), np.float32)})
    with pytest.raises(se.SlimError, match="this call runs lemur bundles"):
        session.score(bank, [[0]], [[1]])


# Runs export-engine's main in a fresh interpreter and reports its time and peak memory growth, both taken after the
# imports (torch alone is a few hundred MB).
_MEASURED_EXPORT = r"""
import resource, sys, time
import slimengine.export.checkpoint, slimengine.export.lemur_export
from slimengine.export.cli import main
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
code = main(sys.argv[1:])
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
print(f"MEASURED {code} {time.perf_counter() - start:.3f} {grown:.0f}", file=sys.stderr)
"""


def _measured_export(checkpoint, out):
    proc = subprocess.run([sys.executable, "-c", _MEASURED_EXPORT, str(checkpoint), "-o", str(out), "-q"], capture_output=True,
                          text=True, timeout=600)
    code, seconds, grown_mb = proc.stderr.split("MEASURED ")[1].split()
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("MEASURED")]
    return int(code), float(seconds), float(grown_mb), lines


@pytest.mark.parametrize("case", ["no-weights", "tiny-weights"])
def test_a_lemur_config_claiming_a_huge_model_is_refused_before_anything_is_allocated(tmp_path, lemur_checkpoint, case):
    from safetensors import safe_open
    from safetensors.torch import load_file

    # About 1 GB of weights claimed (two embedding tables of 2M x 64, or 4M x 32); the old exporter allocated them first.
    path = tmp_path / f"{case}.pt"
    if case == "no-weights":
        claimed = {"family": "lemur", "lemur_config": {"vocab_size": 2_000_000}}
        torch.save({"state_dict": {}, "slimengine": claimed}, path, _use_new_zipfile_serialization=False)
        assert path.stat().st_size < 1000
        expected = "the config does not match the weights"
    else:  # the tiny model's weights, with a vocabulary claimed 13000 times larger
        with safe_open(str(lemur_checkpoint), framework="pt") as f:
            claimed = json.loads(f.metadata()["slimengine"])
        claimed["lemur_config"]["vocab_size"] = 4_000_000
        torch.save({"state_dict": load_file(str(lemur_checkpoint)), "slimengine": claimed}, path)
        expected = "expected [4000000, 32] for its lemur_config"
    code, seconds, grown_mb, lines = _measured_export(path, tmp_path / "x.engine")
    print(f"{case}: refused in {seconds:.2f} s, peak RSS growth {grown_mb:.0f} MB")
    assert code == 2 and len(lines) == 1 and str(path) in lines[0] and expected in lines[0], lines
    assert seconds < 3 and grown_mb < 100
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_expanded_or_overlapping_lemur_tensors_are_refused_and_dense_views_accepted(tmp_path, lemur_checkpoint, model):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(lemur_checkpoint), framework="pt") as f:
        metadata = json.loads(f.metadata()["slimengine"])
    state = load_file(str(lemur_checkpoint))
    # Every tensor one repeated number: a few KB on disk that would export as a full bundle.
    expanded = {k: torch.full((1,) * v.dim(), 0.01).expand(v.shape) for k, v in state.items()}
    overlapping = dict(state)
    weight = state["ctr.0.weight"]  # rows that start one element apart: each overlaps the next
    overlapping["ctr.0.weight"] = torch.randn(weight.numel()).as_strided(weight.shape, (1, 1))
    for name, tensors in (("expanded", expanded), ("overlapping", overlapping)):
        path = tmp_path / f"{name}.pt"
        torch.save({"state_dict": tensors, "slimengine": metadata}, path)
        proc = run_cli("export-engine", str(path), "-o", str(tmp_path / f"{name}.engine"), "-q", check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert str(path) in lines[0] and "is an expanded, stride-0 or overlapping view" in lines[0], lines[0]
        assert "ctr.0.weight" in lines[0] or name == "expanded"
        assert not (tmp_path / f"{name}.engine").exists() and not list(tmp_path.glob(f".{name}.engine*"))
    # A transposed (non-contiguous but dense) view, and views sharing one storage, are ordinary weights.
    dense = dict(state)
    dense["ctr.0.weight"] = weight.t().contiguous().t()
    both = torch.cat([state["ctr.0.bias"], state["ctr.2.bias"]])
    dense["ctr.0.bias"], dense["ctr.2.bias"] = both.split([state["ctr.0.bias"].numel(), state["ctr.2.bias"].numel()])
    assert not dense["ctr.0.weight"].is_contiguous()
    torch.save({"state_dict": dense, "slimengine": metadata}, tmp_path / "dense.pt")
    loaded = load_lemur_checkpoint(tmp_path / "dense.pt").build_model()
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
