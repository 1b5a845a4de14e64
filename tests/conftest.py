"""Shared fixtures: small seeded SD3 checkpoints and the bundles exported from them.

Bundles are session-scoped because an export traces several graphs (seconds each); every test
that changes a bundle works on its own copy.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from slimengine import _native
from slimengine.export.checkpoint import load_checkpoint
from slimengine.export.sampling_plan import make_plan
from slimengine.tools.make_sd3_checkpoint import main as make_checkpoint_main

ROOT = Path(__file__).resolve().parents[1]


def sanitized_executable(exe: Path, sources: list[Path]) -> Path:
    """A C++ test program built from `sources` with AddressSanitizer and UBSan (runtime/src and the C header on the
    include path); the test is skipped where no C++ compiler exists."""
    compiler = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    flags = ["-std=c++17", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
    subprocess.run([compiler, *flags, f"-I{ROOT / 'runtime/src'}", f"-I{ROOT / 'runtime/include'}", *map(str, sources), "-o", str(exe)],
                   check=True, capture_output=True)
    return exe


def make_checkpoint(path: Path, *args: str) -> Path:
    assert make_checkpoint_main(["-o", str(path), *args]) == 0
    return path


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a console entry point (export-engine, make-sd3-checkpoint, profile-engine) as a user would."""
    module = {"export-engine": "slimengine.export.cli", "make-sd3-checkpoint": "slimengine.tools.make_sd3_checkpoint",
              "profile-engine": "slimengine.tools.profile_engine"}[args[0]]
    proc = subprocess.run([sys.executable, "-m", module, *args[1:]], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def run_python(code: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter, for a call that must not hang: a hang fails the test at `timeout`."""
    try:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {timeout} s (hung):\n{code}") from None


def export(checkpoint: Path, bundle: Path, *args: str) -> Path:
    proc = run_cli("export-engine", str(checkpoint), "-o", str(bundle), "-q", *args)
    bundle.with_suffix(".log").write_text(proc.stderr)
    return bundle


def bank_address(bank) -> int:
    """An open MemoryBank's C handle (slim_bank*), for raw ctypes calls; the test keeps the bank open meanwhile."""
    with bank._handle as address:
        return address


def edit_manifest(bundle: Path, edit) -> dict:
    """Apply `edit(manifest)` to the bundle's manifest and re-sign it (manifest.sha256), as a re-export would: for
    tests that need the runtime to reach a field's validation. An unsigned edit is refused by the digest."""
    from slimengine.export.bundle import write_manifest

    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    write_manifest(bundle, manifest)
    return manifest


def reference_for(checkpoint: Path, bundle_args: dict | None = None):
    """The PyTorch model and plan the runtime must reproduce."""
    ck = load_checkpoint(checkpoint)
    plan = make_plan(ck.config.num_layers, ck.has_compensation, ck.metadata, **(bundle_args or {}))
    return ck.build_model(), plan


def random_inputs(model, batch: int, text_len: int, seed: int):
    rng = np.random.default_rng(seed)
    c = model.config
    text = rng.standard_normal((batch, text_len, c.joint_attention_dim), dtype=np.float32)
    pooled = rng.standard_normal((batch, c.pooled_projection_dim), dtype=np.float32)
    return text, pooled


def relative_error(got, expected) -> float:
    """||got - expected|| / ||expected|| (L2 over the whole tensor)."""
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def distilled_checkpoint(workdir) -> Path:
    """1.x-Distill student with SD3.5 features (qk-norm, dual attention), skipped blocks 1-2 of 4."""
    return make_checkpoint(workdir / "distilled.pt", "--preset", "tiny-3.5", "--seed", "1")


@pytest.fixture(scope="session")
def distilled_bundle(workdir, distilled_checkpoint) -> Path:
    return export(distilled_checkpoint, workdir / "distilled.engine", "--verify")


@pytest.fixture(scope="session")
def distilled_xslim_bundle(workdir, distilled_checkpoint) -> tuple[Path, str]:
    """The distilled student on 6 steps with CFG under an X-Slim schedule that runs every level (full, token, skip,
    block), and the --xslim spec it was exported with (its schedule file stays in workdir): shared by test_xslim and
    test_runtime_loop, which both need exactly this export."""
    schedule = workdir / "xslim-schedule.json"
    schedule.write_text(json.dumps({"steps": [{"level": "full"}, {"level": "full"}, {"level": "token", "sample_ratio": 0.4},
                                              {"level": "skip"}, {"level": "block", "block_threshold": 0.8}, {"level": "full"}]}))
    spec = f"xslim:schedule={schedule},first=0"
    return export(distilled_checkpoint, workdir / "distilled-xslim.engine", "--steps", "6", "--guidance-scale", "3", "--xslim", spec), spec


@pytest.fixture(scope="session")
def plain_checkpoint(workdir) -> Path:
    """Plain SD3 (no compensation weights), original MMDiT key names behind a wrapper prefix."""
    return make_checkpoint(workdir / "plain.safetensors", "--preset", "tiny", "--plain", "--seed", "2",
                           "--key-format", "original", "--prefix", "module.")


@pytest.fixture(scope="session")
def identity_bundle(workdir, plain_checkpoint) -> Path:
    """A plain model given a skipped range: Δ reused as-is (identity compensation)."""
    return export(plain_checkpoint, workdir / "identity.engine", "--skip-blocks", "1-2", "--steps", "3")


@pytest.fixture(scope="session")
def cfg_bundle(workdir, plain_checkpoint) -> Path:
    """A plain multi-step plan with classifier-free guidance."""
    return export(plain_checkpoint, workdir / "cfg.engine", "--steps", "3", "--guidance-scale", "4.5")


TOY_CHECKPOINT = Path(__file__).resolve().parents[1] / "models" / "toy-sd3.safetensors"  # the distilled 1.x student
TOY_TEACHER = Path(__file__).resolve().parents[1] / "models" / "toy-sd3-teacher.safetensors"  # its flow-matching teacher
TOY_PROMPTS = Path(__file__).resolve().parents[1] / "models" / "toy-prompts.txt"  # distill-1x's prompts (template 0 held out)
TOY_PIPELINE = Path(__file__).resolve().parents[1] / "models" / "toy-pipeline"


@pytest.fixture(scope="session")
def toy_bundles(workdir) -> dict[str, Path]:
    """The trained toy pipeline (prompt to image): the student with its own 1.x plan, and the teacher with 28 steps and CFG."""
    return {"1x": export(TOY_CHECKPOINT, workdir / "toy-1x.engine", "--pipeline", str(TOY_PIPELINE)),
            "28-step CFG": export(TOY_TEACHER, workdir / "toy-28.engine", "--pipeline", str(TOY_PIPELINE), "--skip-blocks", "none",
                                  "--steps", "28", "--guidance-scale", "4", "--token-stages")}


@pytest.fixture(scope="session")
def toy_class_embeds() -> dict[str, np.ndarray]:
    """The 18 class prompts' conditioning ("a red circle", ...) and the empty negative's, by the toy pipeline's encoders."""
    from slimengine.tools import toy_shapes

    prompts = toy_shapes.class_prompts()
    text, pooled = toy_shapes.prompt_embeds(TOY_PIPELINE, prompts)
    neg_text, neg_pooled = toy_shapes.prompt_embeds(TOY_PIPELINE, [""] * len(prompts))
    return {"prompt_embeds": text, "pooled_embeds": pooled, "negative_prompt_embeds": neg_text, "negative_pooled_embeds": neg_pooled}


@pytest.fixture()
def bundle_copy(tmp_path, distilled_bundle) -> Path:
    dest = tmp_path / "copy.engine"
    shutil.copytree(distilled_bundle, dest)
    return dest


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(2)


class CApiCall:
    """slim_generate called through raw ctypes, so that nothing in Python pre-validates its arguments."""

    def __init__(self, engine):
        self.lib = _native.lib()
        self.session = engine.session()
        c = engine.config
        self.text = np.zeros((1, 4, c["joint_attention_dim"]), np.float32)
        self.pooled = np.zeros((1, c["pooled_projection_dim"]), np.float32)
        self.out = np.zeros((1, c["out_channels"], 8, 8), np.float32)
        self.keep = []

    def tensor(self, arr, dtype=0, device=1, shape=None):
        shape = arr.shape if shape is None else shape
        dims = (ctypes.c_int64 * len(shape))(*shape)
        t = _native.SlimTensor(arr.ctypes.data, dtype, device, 0, len(shape), dims, None)
        self.keep += [arr, dims, t]
        return ctypes.pointer(t)

    def generate(self, params=None, out=None, **overrides):
        p = params or _native.params(_native.GenerateParams)
        if params is None:
            p.prompt_embeds = self.tensor(self.text)
            p.pooled_embeds = self.tensor(self.pooled)
        fields = {name for name, _ in p._fields_}
        for k, v in overrides.items():
            if k not in fields:  # ctypes would keep it as a plain attribute: the call would not see it
                raise AttributeError(f"slim_generate_params has no field {k!r}")
            setattr(p, k, v)
        code = self.lib.slim_generate(self.session._handle, ctypes.byref(p), out or self.tensor(self.out), None)
        return self.lib.slim_status_name(code).decode(), self.lib.slim_last_error().decode()


# ---- LEMUR: a tiny seeded recommender and its bundle (tests/test_lemur*.py) ----


@pytest.fixture(scope="session")
def lemur_checkpoint(workdir) -> Path:
    from slimengine.tools.make_lemur_checkpoint import main as make_lemur_main

    path = workdir / "lemur-tiny.safetensors"
    assert make_lemur_main(["-o", str(path), "--preset", "tiny", "--seed", "3"]) == 0
    return path


@pytest.fixture(scope="session")
def lemur_bundle(workdir, lemur_checkpoint) -> Path:
    return export(lemur_checkpoint, workdir / "lemur-tiny.engine", "--verify", "--model-version", "7")


# The tiny random diffusers SD3 pipeline (tests/pipeline_files.py) and its bundles, shared by the pipeline export,
# prompt-to-image (Python and C) tests: each export traces five graphs.
PIPELINE_T5_LENGTH = 32


@pytest.fixture(scope="session")
def sd3_pipeline(workdir) -> Path:
    from tests.pipeline_files import make_sd3_pipeline

    return make_sd3_pipeline(workdir / "sd3-pipeline")


@pytest.fixture(scope="session")
def sd3_pipeline_bundle(workdir, sd3_pipeline) -> Path:
    """The whole folder: transformer, encoders, VAE, tokenizers."""
    return export(sd3_pipeline, workdir / "sd3-pipeline.engine", "--max-sequence-length", str(PIPELINE_T5_LENGTH))


@pytest.fixture(scope="session")
def sd3_pipeline_no_t5_bundle(workdir, sd3_pipeline) -> Path:
    """The transformer with --pipeline and --no-t5: zeros in T5's place."""
    return export(sd3_pipeline / "transformer", workdir / "sd3-pipeline-no-t5.engine", "--pipeline", str(sd3_pipeline), "--no-t5",
                  "--max-sequence-length", str(PIPELINE_T5_LENGTH))
