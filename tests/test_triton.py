"""Serving on Triton Inference Server: `slimengine triton-repo` repositories run on a real tritonserver (the one in the
nvidia-pytriton wheel), bound to loopback, reached with tritonclient over HTTP and gRPC. No mocks: every answer is
compared bit for bit with the same call made directly on the runtime."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.client import HTTPConnection, HTTPException

import numpy as np
import psutil
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

import slimengine as se
from slimengine.serving import RepositoryOptions, write_repository
from slimengine.serving.server import ServerError, TritonServer, free_port
from slimengine.staging import OutputPathError

PROTOCOLS = {"http": thttp, "grpc": tgrpc}


def infer(client, protocol, model: str, inputs: dict[str, np.ndarray], output: str) -> np.ndarray:
    module = PROTOCOLS[protocol]
    tensors = []
    for name, value in inputs.items():
        t = module.InferInput(name, list(value.shape), "BYTES" if value.dtype == object else np_to_triton_dtype(value.dtype))
        t.set_data_from_numpy(value)
        tensors.append(t)
    return client.infer(model, tensors).as_numpy(output)


def client_for(server, protocol):
    return thttp.InferenceServerClient(server.http_url) if protocol == "http" else tgrpc.InferenceServerClient(server.grpc_url)


def scalar(value, dtype, rows: int = 1) -> np.ndarray:
    return np.full((rows, 1), value, dtype=dtype)


# ---- fixtures: the toy SD3 and LEMUR bundles (conftest), a memory bank written directly, the repository, the server ----


@pytest.fixture(scope="module")
def sd3_engine(distilled_bundle):
    with se.open_engine(distilled_bundle) as engine:
        yield engine


@pytest.fixture(scope="module")
def lemur_engine(lemur_bundle):
    with se.open_engine(lemur_bundle) as engine:
        yield engine


def documents(config: dict, batch: int, text_len: int, frames: int, seed: int):
    rng = np.random.default_rng(seed)
    text_ids = rng.integers(1, config["vocab_size"], (batch, text_len))
    segment_ids = rng.integers(0, config["num_segments"], (batch, text_len))
    pixels = rng.standard_normal((batch, frames, 3, config["image_size"], config["image_size"]), dtype=np.float32)
    return text_ids, segment_ids, pixels


BANK_DOCS = 50


@pytest.fixture(scope="module")
def bank_path(tmp_path_factory, lemur_engine):
    """The bank's writer is outside the server (docs/serving.md): here, a direct embed into it."""
    path = tmp_path_factory.mktemp("triton") / "docs.bank"
    text_ids, segment_ids, pixels = documents(lemur_engine.config, BANK_DOCS, 12, 2, seed=0)
    with se.MemoryBank(path, dim=lemur_engine.config["embed_dim"]) as bank:
        lemur_engine.session().embed(text_ids, pixels, segment_ids=segment_ids, bank=bank, document_ids=np.arange(BANK_DOCS))
    return path


@pytest.fixture(scope="module")
def repository(tmp_path_factory, distilled_bundle, lemur_bundle, bank_path):
    out = tmp_path_factory.mktemp("triton") / "repo"
    write_repository([str(distilled_bundle), str(lemur_bundle)], out, RepositoryOptions(bank=bank_path, threads=1))
    return out


@pytest.fixture(scope="module")
def server(repository):
    srv = TritonServer(repository).start()
    yield srv
    assert srv.stop() == 0, srv.log_tail()


@pytest.fixture(scope="module")
def http(server):
    client = thttp.InferenceServerClient(server.http_url)
    yield client
    client.close()  # an open keep-alive connection would hold the server's shutdown until its exit timeout


@pytest.fixture(scope="module")
def grpc(server):
    client = tgrpc.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


@pytest.fixture()
def clients(http, grpc):
    return {"http": http, "grpc": grpc}


# ---- the repository ----


def test_repository_layout_atomic_write_and_refusal_to_overwrite(repository, tmp_path, distilled_bundle, lemur_bundle):
    assert sorted(p.name for p in repository.iterdir()) == ["lemur_embed", "lemur_score", "sd3"]
    for model in ("sd3", "lemur_embed", "lemur_score"):
        config = (repository / model / "config.pbtxt").read_text()
        assert f'name: "{model}"' in config and 'backend: "python"' in config and "dynamic_batching" in config
        assert "import triton_python_backend_utils" in (repository / model / "1" / "model.py").read_text()
    assert f'string_value: "{distilled_bundle.resolve()}"' in (repository / "sd3" / "config.pbtxt").read_text()  # by path, not copied

    out = tmp_path / "repo"
    cli = [sys.executable, "-m", "slimengine.cli", "triton-repo"]
    assert subprocess.run([*cli, str(lemur_bundle), "-o", str(out)], capture_output=True, text=True).returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["lemur_embed"]  # no --bank: no lemur_score
    again = subprocess.run([*cli, str(distilled_bundle), "-o", str(out)], capture_output=True, text=True)
    assert again.returncode == 2 and "already exists (use --force" in again.stderr  # a usage error, before opening bundles
    assert sorted(p.name for p in out.iterdir()) == ["lemur_embed"]  # untouched
    forced = subprocess.run([*cli, str(distilled_bundle), "-o", str(out), "--force"], capture_output=True, text=True)
    assert forced.returncode == 0, forced.stderr
    assert sorted(p.name for p in out.iterdir()) == ["sd3"]
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]  # no temporary left behind
    bad = subprocess.run([*cli, str(tmp_path / "missing.engine"), "-o", str(tmp_path / "r2")], capture_output=True, text=True)
    assert bad.returncode == 1 and "not an engine bundle directory" in bad.stderr and not (tmp_path / "r2").exists()


def test_force_replaces_only_a_repository_directory(tmp_path, lemur_bundle):
    """-o naming a file or a symbolic link is refused, even with --force: nothing is renamed, removed or left behind."""
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "afile").write_text("keep me")
    (tmp_path / "alink").symlink_to(target)
    for name in ("afile", "alink"):
        with pytest.raises(OutputPathError, match="is not a directory"):
            write_repository([str(lemur_bundle)], tmp_path / name, force=True)
    assert (tmp_path / "afile").read_text() == "keep me" and (tmp_path / "alink").resolve() == target
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "alink", "target"] and not any(target.iterdir())
    with pytest.raises(ValueError, match="threads must be >= 0"):  # refused here, not when the server loads the model
        write_repository([str(lemur_bundle)], tmp_path / "r", RepositoryOptions(threads=-1))


HOLD_TEMPORARY = """
import sys, time
from pathlib import Path
from slimengine.staging import hold_lock, temporary_path
tmp = temporary_path(Path(sys.argv[1]))
(tmp / "sd3").mkdir(parents=True)
hold_lock(tmp)
print("ready", flush=True)
time.sleep(600)
"""


def test_the_next_triton_repo_removes_what_a_killed_one_left(tmp_path, lemur_bundle):
    """A triton-repo killed midway leaves `.repo.tmp-PID` beside -o: the next run to the same -o removes it (one line
    each), both a killed writer's (its lock free) and one whose process is gone (no lock yet), never a live writer's."""
    out = tmp_path / "repo"
    writers = [subprocess.Popen([sys.executable, "-c", HOLD_TEMPORARY, str(out)], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        killed, live = writers
        for w in writers:
            assert w.stdout.readline() == "ready\n"
        killed.kill()
        killed.wait()
        gone = subprocess.Popen(["true"])
        gone.wait()  # exited and reaped: its pid names no process now
        unlocked = tmp_path / f".repo.tmp-{gone.pid}"  # no lock in it (a writer killed before it locked)
        unlocked.mkdir()
        (tmp_path / ".other.tmp-1").mkdir()  # another target's: not ours
        result = subprocess.run([sys.executable, "-m", "slimengine.cli", "triton-repo", str(lemur_bundle), "-o", str(out)],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        stale = [tmp_path / f".repo.tmp-{killed.pid}", unlocked]
        lines = [line for line in result.stderr.splitlines() if "removed stale temporary" in line]
        assert sorted(lines) == sorted(f"slimengine triton-repo: removed stale temporary {p} of an interrupted triton-repo" for p in stale)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".other.tmp-1", f".repo.tmp-{live.pid}", "repo"])
        assert sorted(p.name for p in out.iterdir()) == ["lemur_embed"]
    finally:
        for w in writers:
            w.kill()
            w.wait()


# ---- health, readiness, answers equal to direct calls ----


def test_health_and_per_model_readiness(server, clients):
    with urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready") as r:
        assert r.status == 200
    for client in clients.values():
        assert client.is_server_live() and client.is_server_ready()
        for model in ("sd3", "lemur_embed", "lemur_score"):
            assert client.is_model_ready(model)
        assert not client.is_model_ready("no_such_model")
    metadata = clients["http"].get_model_metadata("sd3")
    assert {i["name"] for i in metadata["inputs"]} >= {"prompt_embeds", "pooled_embeds", "seed", "guidance_scale", "xslim"}
    assert [o["name"] for o in metadata["outputs"]] == ["latents"]


def sd3_request(config: dict, rows: int, text_len: int, seed: int, **settings) -> tuple[dict, dict]:
    """(the Triton inputs, the matching Session.generate keyword arguments)."""
    rng = np.random.default_rng(seed)
    inputs = {"prompt_embeds": rng.standard_normal((rows, text_len, config["joint_attention_dim"]), dtype=np.float32),
              "pooled_embeds": rng.standard_normal((rows, config["pooled_projection_dim"]), dtype=np.float32),
              "seed": scalar(seed, np.uint64, rows)}
    kwargs = {"seed": seed}
    if settings.get("guidance_scale", 1) > 1:
        inputs["negative_prompt_embeds"] = rng.standard_normal(inputs["prompt_embeds"].shape, dtype=np.float32)
        inputs["negative_pooled_embeds"] = rng.standard_normal(inputs["pooled_embeds"].shape, dtype=np.float32)
        kwargs.update(negative_prompt_embeds=inputs["negative_prompt_embeds"], negative_pooled_embeds=inputs["negative_pooled_embeds"])
    dtypes = {"guidance_scale": np.float32, "num_steps": np.int32, "height": np.int32, "width": np.int32, "shift": np.float32,
              "xslim_threshold": np.float32, "xslim": object}
    for name, value in settings.items():
        inputs[name] = scalar(value.encode() if name == "xslim" else value, dtypes[name], rows)
        kwargs[name] = value
    return inputs, kwargs


SD3_CASES = [dict(), dict(guidance_scale=4.5), dict(num_steps=3, height=16, width=8), dict(xslim="xslim:step=0.05"),
             dict(xslim_threshold=0.0, xslim="none")]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_sd3_answers_equal_direct_generate_bit_for_bit(protocol, clients, sd3_engine):
    session = sd3_engine.session()
    for i, settings in enumerate(SD3_CASES):
        inputs, kwargs = sd3_request(sd3_engine.config, rows=1 + i % 2, text_len=5 + i, seed=100 + i, **settings)
        got = infer(clients[protocol], protocol, "sd3", inputs, "latents")
        expected = session.generate(inputs["prompt_embeds"], inputs["pooled_embeds"], **kwargs).latents
        assert got.dtype == np.float32 and np.array_equal(got, expected), settings


def test_concurrent_sd3_requests_share_a_cfg_batch_and_keep_their_own_results(server, sd3_engine, http):
    session = sd3_engine.session()
    requests = [sd3_request(sd3_engine.config, rows=1, text_len=6, seed=200 + i, guidance_scale=3.0) for i in range(8)]
    before = http.get_inference_statistics("sd3")["model_stats"][0]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        def one(req):
            with thttp.InferenceServerClient(server.http_url) as client:
                return infer(client, "http", "sd3", req[0], "latents")
        results = list(pool.map(one, requests))
    after = http.get_inference_statistics("sd3")["model_stats"][0]
    for (inputs, kwargs), got in zip(requests, results):
        assert np.array_equal(got, session.generate(inputs["prompt_embeds"], inputs["pooled_embeds"], **kwargs).latents)
    inferences, executions = (after[k] - before[k] for k in ("inference_count", "execution_count"))
    print(f"8 concurrent SD3 requests: {executions} executions")
    assert inferences == 8 and executions < 8  # some requests ran together (one generate call, one CFG batch)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_lemur_embed_and_score_equal_direct_calls_bit_for_bit(protocol, clients, lemur_engine, bank_path):
    session, c = lemur_engine.session(), lemur_engine.config
    for batch, text_len, frames in [(1, 1, 1), (3, 17, 2), (64, 12, 2)]:
        text_ids, segment_ids, pixels = documents(c, batch, text_len, frames, seed=batch)
        got = infer(clients[protocol], protocol, "lemur_embed", {"text_ids": text_ids, "segment_ids": segment_ids, "frames": pixels},
                    "embedding")
        assert np.array_equal(got, session.embed(text_ids, pixels, segment_ids=segment_ids).embeddings)
    got = infer(clients[protocol], protocol, "lemur_embed", {"text_ids": text_ids, "frames": pixels}, "embedding")
    assert np.array_equal(got, session.embed(text_ids, pixels).embeddings)  # segment_ids left out: every token in segment 0

    rng = np.random.default_rng(1)
    history = rng.integers(0, BANK_DOCS, (5, 9))
    history[0, 4:] = -1
    query = rng.integers(1, c["vocab_size"], (5, 4))
    with se.MemoryBank(bank_path, read_only=True) as bank:
        expected = session.score(bank, history, query).scores
        got = infer(clients[protocol], protocol, "lemur_score", {"history_ids": history, "query_ids": query}, "score")
        assert got.shape == (5, 1) and np.array_equal(got[:, 0], expected)
        history[1, 2] = 10**6  # missing from the bank: skipped on request
        got = infer(clients[protocol], protocol, "lemur_score", {"history_ids": history, "query_ids": query,
                                                                 "skip_missing": scalar(True, bool, 5)}, "score")
        assert np.array_equal(got[:, 0], session.score(bank, history, query, skip_missing=True).scores)


def test_lemur_score_sees_what_the_banks_writer_appends_while_serving(http, lemur_engine, bank_path):
    """lemur_score opens the bank read-only; documents its (outside) writer adds later are scored without a restart."""
    text_ids, segment_ids, pixels = documents(lemur_engine.config, 1, 8, 1, seed=77)
    history, query = np.array([[BANK_DOCS + 7]]), np.array([[3, 4]])
    with pytest.raises(InferenceServerException, match=f"{BANK_DOCS + 7}"):
        infer(http, "http", "lemur_score", {"history_ids": history, "query_ids": query}, "score")
    with se.MemoryBank(bank_path) as bank:  # the one writer
        lemur_engine.session().embed(text_ids, pixels, segment_ids=segment_ids, bank=bank, document_ids=[BANK_DOCS + 7])
    got = infer(http, "http", "lemur_score", {"history_ids": history, "query_ids": query}, "score")
    with se.MemoryBank(bank_path, read_only=True) as bank:
        assert np.array_equal(got[:, 0], lemur_engine.session().score(bank, history, query).scores)


def test_lemur_score_follows_a_bank_replaced_by_rename(server, http, lemur_engine, bank_path, tmp_path):
    """A new copy of the bank published by rename is served from the next request on (it kept the old file until a
    reload); a replacement that is not a bank is refused with a warning in Triton's log and the old file keeps serving."""
    new_doc = BANK_DOCS + 100
    history, query = np.array([[new_doc, 1]]), np.array([[3, 4]])
    copy = bank_path.with_name("docs.bank.new")
    shutil.copyfile(bank_path, copy)
    text_ids, segment_ids, pixels = documents(lemur_engine.config, 1, 8, 1, seed=78)
    with se.MemoryBank(copy) as bank:  # the new copy has one more document; the served file does not
        lemur_engine.session().embed(text_ids, pixels, segment_ids=segment_ids, bank=bank, document_ids=[new_doc])
    with pytest.raises(InferenceServerException, match=f"{new_doc}"):
        infer(http, "http", "lemur_score", {"history_ids": history, "query_ids": query}, "score")
    os.replace(copy, bank_path)  # publish by rename
    got = infer(http, "http", "lemur_score", {"history_ids": history, "query_ids": query}, "score")
    with se.MemoryBank(bank_path, read_only=True) as bank:
        expected = lemur_engine.session().score(bank, history, query).scores
    assert np.array_equal(got[:, 0], expected)

    good = bank_path.with_name("docs.bank.good")
    os.link(bank_path, good)  # to put back
    garbage = bank_path.with_name("docs.bank.garbage")
    garbage.write_bytes(b"not a memory bank" * 100)
    os.replace(garbage, bank_path)
    for _ in range(2):  # warned once; served from the file it has open
        got = infer(http, "http", "lemur_score", {"history_ids": history, "query_ids": query}, "score")
        assert np.array_equal(got[:, 0], expected)
    assert "does not open as a memory bank" in server.log_tail() and "still serving the previous file" in server.log_tail()
    os.replace(good, bank_path)  # the same file as the one served: nothing to reopen
    got = infer(http, "http", "lemur_score", {"history_ids": history, "query_ids": query}, "score")
    assert np.array_equal(got[:, 0], expected)


# ---- errors: the runtime's message, and the model keeps serving ----


def test_bad_requests_get_the_runtimes_message_and_the_next_good_one_succeeds(server, http, grpc, sd3_engine, lemur_engine):
    c = sd3_engine.config
    good, kwargs = sd3_request(c, 1, 4, seed=9)
    nan = dict(good, prompt_embeds=good["prompt_embeds"].copy())
    nan["prompt_embeds"][0, 1, 2] = np.nan
    cases = [
        (nan, "prompt_embeds contains NaN or Inf"),
        (dict(good, xslim=scalar(b"bogus", object)), "unknown X-Slim policy 'bogus'"),
        (dict(good, xslim=scalar(b"xslim:schedule=/etc/passwd", object)), "a request cannot name one"),
        (dict(good, height=scalar(4096, np.int32)), f"height must be a multiple of {c['patch_size']} up to {c['max_latent_size']}"),
        (dict(good, guidance_scale=scalar(np.inf, np.float32)), "guidance_scale must be a finite number"),
        (dict(good, seed=np.array([[1], [2]], np.uint64), prompt_embeds=np.repeat(good["prompt_embeds"], 2, 0),
              pooled_embeds=np.repeat(good["pooled_embeds"], 2, 0)), "seed: one value per request"),
        (dict(good, prompt_embeds=good["prompt_embeds"].astype(np.float64)), "FP64"),  # wrong type: Triton's own check
        (dict(good, pooled_embeds=np.zeros((1, c["pooled_projection_dim"] + 1), np.float32)), "pooled_embeds"),  # wrong shape
    ]
    for protocol, client in (("http", http), ("grpc", grpc)):
        for inputs, message in cases:
            with pytest.raises(InferenceServerException, match=re.escape(message)):
                infer(client, protocol, "sd3", inputs, "latents")
        got = infer(client, protocol, "sd3", good, "latents")
        assert np.array_equal(got, sd3_engine.session().generate(good["prompt_embeds"], good["pooled_embeds"], **kwargs).latents)

    text_ids, _, pixels = documents(lemur_engine.config, 2, 5, 1, seed=3)
    bad_pixels = pixels.copy()
    bad_pixels[1, 0, 0, 0, 0] = np.nan
    with pytest.raises(InferenceServerException, match="frames contains NaN or Inf"):
        infer(http, "http", "lemur_embed", {"text_ids": text_ids, "frames": bad_pixels}, "embedding")
    with pytest.raises(InferenceServerException, match="text_ids"):
        infer(http, "http", "lemur_embed", {"text_ids": text_ids + 10**9, "frames": pixels}, "embedding")

    # A bad request batched with good ones fails alone: the others are answered.
    good_docs = [documents(lemur_engine.config, 1, 5, 1, seed=s) for s in range(6)]
    reqs = [{"text_ids": t, "frames": p} for t, _, p in good_docs]
    reqs[3] = {"text_ids": reqs[3]["text_ids"], "frames": bad_pixels[1:]}
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        def one(inputs):
            with thttp.InferenceServerClient(server.http_url) as client:
                try:
                    return infer(client, "http", "lemur_embed", inputs, "embedding")
                except InferenceServerException as e:
                    return e
        results = list(pool.map(one, reqs))
    session = lemur_engine.session()
    for i, (inputs, got) in enumerate(zip(reqs, results)):
        if i == 3:
            assert isinstance(got, InferenceServerException) and "NaN" in str(got)
        else:
            assert np.array_equal(got, session.embed(inputs["text_ids"], inputs["frames"]).embeddings)
    assert http.is_model_ready("sd3") and http.is_model_ready("lemur_embed")


def test_bad_requests_are_client_errors_and_nan_settings_get_the_runtimes_message(http, grpc, sd3_engine):
    """A request's own error is HTTP 400 / gRPC INVALID_ARGUMENT (not 500 / INTERNAL, which clients retry); a NaN
    setting is reported by the runtime's range check; an X-Slim policy that is not UTF-8 is named as such."""
    good, _ = sd3_request(sd3_engine.config, 1, 4, seed=9)
    cases = [(dict(good, shift=scalar(np.nan, np.float32)), "shift must be a finite number > 0, got nan"),
             (dict(good, guidance_scale=scalar(np.nan, np.float32)), "guidance_scale must be a finite number"),
             (dict(good, xslim=np.array([[b"\xff\xfe"]], dtype=object)), "xslim: not UTF-8 text"),
             (dict(good, height=scalar(7, np.int32)), "height must be a multiple of")]
    for protocol, client, status in (("http", http, "400"), ("grpc", grpc, "StatusCode.INVALID_ARGUMENT")):
        for inputs, message in cases:
            with pytest.raises(InferenceServerException, match=re.escape(message)) as e:
                infer(client, protocol, "sd3", inputs, "latents")
            assert e.value.status() == status, (protocol, message)


def test_a_huge_xslim_policy_is_not_echoed_back_in_full(http, sd3_engine, tmp_path):
    """A 1 MB X-Slim policy string was echoed whole in the error (a megabyte back per bad request, and in logs): user
    text in a message is cut to its first 200 characters and its size, over Triton and in a direct call."""
    good, _ = sd3_request(sd3_engine.config, 1, 4, seed=9)
    junk = "q" * (1 << 20)
    for policy, start in ((junk, "unknown X-Slim policy 'qqq"), (f"xslim:{junk}=1", "X-Slim option 'qqq"),
                          (f"xslim:step={junk}", "X-Slim option step='qqq")):
        with pytest.raises(InferenceServerException) as e:
            infer(http, "http", "sd3", dict(good, xslim=np.array([[policy.encode()]], dtype=object)), "latents")
        assert start in str(e.value) and len(str(e.value)) < 2000 and "… (1048576 bytes)" in str(e.value)
        with pytest.raises(ValueError) as e:
            sd3_engine.session().generate(good["prompt_embeds"], good["pooled_embeds"], xslim=policy)
        assert start in str(e.value) and len(str(e.value)) < 1000 and "q" * 200 + "… (1048576 bytes)" in str(e.value)
    with pytest.raises(ValueError) as e:  # a schedule path (a local call's) likewise
        sd3_engine.session().generate(good["prompt_embeds"], good["pooled_embeds"], xslim=f"xslim:schedule={tmp_path}/{junk}")
    assert "cannot read schedule" in str(e.value) and len(str(e.value)) < 1000


def test_an_xslim_policy_with_a_nul_byte_is_refused_naming_the_nul(http, sd3_engine):
    """b"none\\x00" was answered "xslim: one value per request" (numpy's bytes scalars drop trailing NULs), and
    b"no\\x00ne" reached the runtime as "no" (a C string ends at the NUL): both are refused as what they are."""
    good, _ = sd3_request(sd3_engine.config, 1, 4, seed=9)
    for policy, offset in ((b"none\x00", 4), (b"no\x00ne", 2), (b"\x00", 0)):
        with pytest.raises(InferenceServerException, match=re.escape(f"xslim: a NUL byte at offset {offset}")) as e:
            infer(http, "http", "sd3", dict(good, xslim=np.array([[policy]], dtype=object)), "latents")
        assert e.value.status() == "400" and "one value per request" not in str(e.value)
    two_rows, _ = sd3_request(sd3_engine.config, 2, 4, seed=9)  # rows that differ only past a NUL still differ
    with pytest.raises(InferenceServerException, match="xslim: one value per request"):
        infer(http, "http", "sd3", dict(two_rows, xslim=np.array([[b"none"], [b"none\x00"]], dtype=object)), "latents")


# ---- metrics, load ----


def metric(server, name: str, model: str) -> float:
    text = urllib.request.urlopen(server.metrics_url).read().decode()
    match = re.search(rf'^{name}{{[^}}]*model="{model}"[^}}]*}} (\S+)$', text, re.M)
    assert match, f"{name} for {model} not in the metrics"
    return float(match.group(1))


def test_prometheus_metrics_count_the_requests(server, http, lemur_engine):
    names = ("nv_inference_request_success", "nv_inference_count", "slimengine_request_failure")
    before = {name: metric(server, name, "lemur_embed") for name in names}
    text_ids, _, pixels = documents(lemur_engine.config, 2, 5, 1, seed=4)
    for _ in range(5):
        infer(http, "http", "lemur_embed", {"text_ids": text_ids, "frames": pixels}, "embedding")
    with pytest.raises(InferenceServerException, match="NaN"):  # the runtime's error: an error response
        infer(http, "http", "lemur_embed", {"text_ids": text_ids, "frames": pixels * np.nan}, "embedding")
    delta = {name: metric(server, name, "lemur_embed") - before[name] for name in names}
    # Triton counts an error response as a success (Python backend); slimengine_request_failure counts it as a failure.
    assert delta == {"nv_inference_request_success": 6, "nv_inference_count": 12, "slimengine_request_failure": 1}
    assert metric(server, "nv_inference_queue_duration_us", "lemur_embed") >= 0  # what docs/serving.md autoscales on


def test_load_32_clients_x_20_requests_without_a_failure(server, lemur_engine):
    clients, per_client = 32, 20
    session, c = lemur_engine.session(), lemur_engine.config
    work = [documents(c, 1 + (i % 4), 8, 1, seed=1000 + i) for i in range(clients)]
    expected = [session.embed(t, p, segment_ids=s).embeddings for t, s, p in work]

    def client_loop(i):
        text_ids, segment_ids, pixels = work[i]
        latencies, wrong = [], 0
        with thttp.InferenceServerClient(server.http_url) as client:
            for _ in range(per_client):
                start = time.perf_counter()
                got = infer(client, "http", "lemur_embed", {"text_ids": text_ids, "segment_ids": segment_ids, "frames": pixels}, "embedding")
                latencies.append(time.perf_counter() - start)
                wrong += not np.array_equal(got, expected[i])
        return latencies, wrong

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client_loop, range(clients)))  # a client's exception would re-raise here
    wall = time.perf_counter() - start
    latencies = np.array([t for lat, _ in results for t in lat]) * 1e3
    assert latencies.size == clients * per_client and sum(w for _, w in results) == 0
    print(f"load: {clients} clients x {per_client} requests in {wall:.1f} s ({latencies.size / wall:.0f} req/s), latency p50 "
          f"{np.percentile(latencies, 50):.1f} ms, p99 {np.percentile(latencies, 99):.1f} ms, 0 failures")


# ---- model control, clean stop, `slimengine serve` ----


def port_free(port: int) -> bool:
    """Nothing bound to `port` any more. SO_REUSEADDR as servers set it: the connections the server closed wait in
    TIME_WAIT for a minute and would make a plain bind fail, though no socket holds the port."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_unload_reload_and_clean_stop(repository, lemur_engine):
    server = TritonServer(repository, model_control="explicit", models=["lemur_embed"]).start()
    try:
        stubs = psutil.Process(server.process.pid).children(recursive=True)
        with thttp.InferenceServerClient(server.http_url) as client:
            assert client.is_model_ready("lemur_embed") and not client.is_model_ready("sd3")  # only what was asked for
            text_ids, _, pixels = documents(lemur_engine.config, 2, 5, 1, seed=5)
            expected = lemur_engine.session().embed(text_ids, pixels).embeddings
            client.unload_model("lemur_embed")
            assert not client.is_model_ready("lemur_embed")
            with pytest.raises(InferenceServerException):
                infer(client, "http", "lemur_embed", {"text_ids": text_ids, "frames": pixels}, "embedding")
            client.load_model("lemur_embed")
            assert client.is_model_ready("lemur_embed")
            assert np.array_equal(infer(client, "http", "lemur_embed", {"text_ids": text_ids, "frames": pixels}, "embedding"), expected)
        ports = (server.http_port, server.grpc_port, server.metrics_port)
        stubs += psutil.Process(server.process.pid).children(recursive=True)
    finally:
        code = server.stop()
    assert code == 0
    assert not psutil.pid_exists(server.process.pid) or psutil.Process(server.process.pid).status() == psutil.STATUS_ZOMBIE
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in stubs)  # every backend stub process is gone
    assert all(port_free(p) for p in ports)


def test_a_server_whose_port_another_server_holds_fails_to_start(server, repository):
    """The module's server holds this HTTP port: the new one must not take the other's health answer for its own."""
    second = TritonServer(repository, http_port=server.http_port, model_control="explicit")
    try:
        with pytest.raises(ServerError, match=f"127.0.0.1:{server.http_port}' already in use"):
            second.start(timeout=60)
    finally:
        second.stop()
    assert server.ready()


def test_a_model_that_fails_to_load_says_why(tmp_path, lemur_bundle):
    """A repository whose bundle was deleted after it was written: the start error carries the runtime's message (the
    log's tail alone is Triton's settings table)."""
    bundle = tmp_path / "gone.engine"
    shutil.copytree(lemur_bundle, bundle)
    write_repository([str(bundle)], tmp_path / "repo", RepositoryOptions(threads=1))
    shutil.rmtree(bundle)
    with pytest.raises(ServerError, match=re.escape(f"cannot open {bundle}/manifest.json")):
        TritonServer(tmp_path / "repo").start(timeout=60)


def start_serve(bundle, *, ignore_sigint: bool = False) -> tuple[subprocess.Popen, tuple[int, int, int]]:
    """`slimengine serve BUNDLE` on free ports, in a process group of its own (kill_tree), its first stdout line read:
    (the process, (HTTP, gRPC, metrics ports)). ignore_sigint: started with SIGINT ignored, as a background job is."""
    ports = free_port(), free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "slimengine.cli", "serve", str(bundle), "--port", str(ports[0]), "--grpc-port",
                             str(ports[1]), "--metrics-port", str(ports[2]), "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None)
    line = proc.stdout.readline()
    if f"HTTP 127.0.0.1:{ports[0]}" not in line:
        kill_tree(proc)
        raise AssertionError(f"serve did not start: {line}{proc.stderr.read()}")
    return proc, ports


def kill_tree(proc: subprocess.Popen) -> list[psutil.Process]:
    """For `finally`: SIGKILL to the process group of `proc` and of everything it started (its tritonserver has a group
    of its own, with the stubs), then `proc` reaped. Returns the processes found, to check they are gone."""
    tree = []
    with contextlib.suppress(psutil.NoSuchProcess):
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    groups = set()
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(p.pid))
    for group in groups - {os.getpgrp()}:  # never the test run's own
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    for p in tree[1:]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.kill()
    proc.communicate()
    return tree


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_slimengine_serve_stops_on_sigint_even_when_started_with_sigint_ignored(lemur_bundle, lemur_engine):
    """A background job (make test &, nohup) starts its children with SIGINT ignored, and Python then never installs its
    Ctrl-C handler: serve ignored SIGINT and ran on (with its tritonserver and stubs) after the test gave up. serve
    installs its own handler; it stops, exit 0, nothing it started left running, its ports free."""
    proc, ports = start_serve(lemur_bundle, ignore_sigint=True)
    tree = []
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        text_ids, _, pixels = documents(lemur_engine.config, 2, 5, 1, seed=6)
        with thttp.InferenceServerClient(f"127.0.0.1:{ports[0]}") as client:
            got = infer(client, "http", "lemur_embed", {"text_ids": text_ids, "frames": pixels}, "embedding")
        assert np.array_equal(got, lemur_engine.session().embed(text_ids, pixels).embeddings)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=45)
        assert proc.returncode == 0, err
        assert not alive(tree) and all(port_free(p) for p in ports)
    finally:
        kill_tree(proc)
    assert len(tree) >= 3  # serve, its tritonserver, a backend stub: all checked above


def wait_ready(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with thttp.InferenceServerClient(f"127.0.0.1:{port}") as client:
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"serve exited with {proc.returncode}: {proc.communicate()[1]}"
            with contextlib.suppress(Exception):
                if client.is_server_ready():
                    return
            time.sleep(0.3)
    raise AssertionError(f"not ready again after {timeout} s")


def test_slimengine_serve_restarts_a_tritonserver_that_a_request_aborts(lemur_bundle, lemur_engine):
    """Triton 2.51's HTTP frontend allocates a JSON input's declared shape before anything checks it: [1, 2**40, 48]
    INT64 with 336 values is std::bad_alloc, abort (status -6), every model down. serve restarts it on the same ports,
    says so on stderr and counts it in slimengine_server_restarts; the next good request is answered."""
    proc, (port, _, metrics_port) = start_serve(lemur_bundle)
    try:
        hostile = {"inputs": [{"name": "text_ids", "shape": [1, 2**40, 48], "datatype": "INT64", "data": list(range(336))}]}
        connection = HTTPConnection("127.0.0.1", port, timeout=60)
        with pytest.raises((HTTPException, OSError)):  # the server died without an answer
            connection.request("POST", "/v2/models/lemur_embed/infer", json.dumps(hostile), {"Content-Type": "application/json"})
            connection.getresponse()
        connection.close()
        wait_ready(port, proc, timeout=120)
        text_ids, _, pixels = documents(lemur_engine.config, 2, 5, 1, seed=6)
        with thttp.InferenceServerClient(f"127.0.0.1:{port}") as client:
            got = infer(client, "http", "lemur_embed", {"text_ids": text_ids, "frames": pixels}, "embedding")
        assert np.array_equal(got, lemur_engine.session().embed(text_ids, pixels).embeddings)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
        assert re.search(r"^slimengine_server_restarts(\{\})? 1$", metrics, re.M), metrics
        # Triton answers as soon as it is ready; serve says so once its own readiness poll sees it, which on a loaded
        # machine came after this test had already sent SIGTERM (a CI run). Wait for that line (or serve's end) first.
        said = ""
        while "serving lemur_embed again" not in said:
            line = proc.stderr.readline()
            if not line:
                break
            said += line
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=45)
        err = said + err
        assert proc.returncode == 0, err
        assert "tritonserver exited with signal 6 (Aborted); restarting it (restart 1;" in err, err
        assert "serving lemur_embed again (restart 1)" in err
    finally:
        kill_tree(proc)


def tritonserver_of(proc: subprocess.Popen, other_than: int | None = None, timeout: float = 60) -> psutil.Process:
    """The tritonserver `serve` (proc) runs, once one other than pid `other_than` is there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(proc.pid).children():
            with contextlib.suppress(psutil.NoSuchProcess):
                if child.name() == "tritonserver" and child.pid != other_than:
                    return child
        time.sleep(0.02)
    raise AssertionError(f"no new tritonserver after {timeout} s")


def test_slimengine_serve_keeps_restarting_a_tritonserver_killed_while_it_starts(lemur_bundle):
    """A restarted tritonserver killed before serve saw it ready (killed again, a client retrying the request that
    aborts it) made serve exit 1 for good ("exited with status -9 while starting"). serve tries again after a backoff
    and serves again."""
    proc, (port, _, metrics_port) = start_serve(lemur_bundle)
    try:
        first = tritonserver_of(proc)
        first.kill()
        tritonserver_of(proc, other_than=first.pid).kill()  # at once: long before it can be ready
        err = ""
        while "serving lemur_embed again" not in err:  # serve's own word that it saw the server ready (EOF: it exited)
            line = proc.stderr.readline()
            assert line, f"serve exited: {err}"
            err += line
        assert "restart 1 failed (tritonserver exited with status -9 while starting); trying again in 1 s" in err, err
        assert "serving lemur_embed again (restart 2)" in err, err
        wait_ready(port, proc, timeout=10)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
        assert re.search(r"^slimengine_server_restarts(\{\})? 2$", metrics, re.M), metrics
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=45)
        assert proc.returncode == 0, err + rest
    finally:
        kill_tree(proc)


def test_a_server_started_from_another_thread_outlives_that_thread(tmp_path):
    """PR_SET_PDEATHSIG fires when the thread that forked ends, not the process: a server started from a worker thread
    was SIGKILLed as soon as that thread returned."""
    (tmp_path / "repo").mkdir()
    server = TritonServer(tmp_path / "repo", model_control="explicit")
    worker = threading.Thread(target=server.start)
    worker.start()
    worker.join()
    try:
        assert server.process is not None, server.log_tail()
        time.sleep(1)
        assert server.exit_status() is None and server.ready(), server.log_tail()
    finally:
        assert server.stop() == 0, server.log_tail()


def test_slimengine_serve_without_nvidia_pytriton_says_what_to_install(lemur_bundle):
    code = ("import sys; sys.modules['pytriton'] = None  # as if nvidia-pytriton were not installed\n"
            f"from slimengine.cli import main; sys.exit(main(['serve', {str(lemur_bundle)!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert proc.returncode == 1
    assert "nvidia-pytriton package is not installed" in proc.stderr and "slimengine[serve]" in proc.stderr
