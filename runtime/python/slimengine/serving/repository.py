"""`slimengine triton-repo`: a Triton model repository for slimengine bundles.

One Triton model per program: an SD3 bundle gives `sd3` (conditioning embeddings -> latents), a LEMUR bundle gives
`lemur_embed` and, with a memory bank, `lemur_score`. Each model is a `config.pbtxt` and a three-line Python-backend
`1/model.py` that imports slimengine.serving.backend, which opens the bundle **by its path** (a parameter of the
config): bundles are large and verified when opened, so the repository references them instead of copying them
(`bundle_root` rewrites the paths for a container that mounts the bundles elsewhere). Only stock Triton features are
used (no PyTriton ones), so the repository also runs in NVIDIA's Triton container.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from ..staging import LOCK, hold_lock, output_directory, publish, remove_stale_temporaries, temporary_path

NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclasses.dataclass
class RepositoryOptions:
    bank: Path | None = None  # the LEMUR memory bank lemur_score reads (read-only); None: no lemur_score model
    instances: int = 1  # model instances = sessions per engine (each instance is one Python-backend process)
    threads: int = 0  # ONNX Runtime intra-op threads per instance; 0: its default (all cores)
    sd3_max_batch: int = 8  # rows per execution (dynamic batching combines requests up to this)
    lemur_max_batch: int = 256
    sd3_queue_delay_us: int = 2000  # how long the dynamic batcher waits for more requests
    lemur_queue_delay_us: int = 500
    device: str = "cpu"  # "cpu" or "cuda": cuda puts the instances on GPUs (KIND_GPU), each on its instance's device
    bundle_root: Path | None = None  # write bundle (and bank) paths as bundle_root/NAME: where the server sees them


@dataclasses.dataclass
class ModelSpec:
    name: str  # the Triton model's name
    kind: str  # "sd3", "lemur_embed" or "lemur_score"
    engine: Path  # the bundle, absolute
    config: dict  # the bundle's manifest config


def _family(path: Path) -> tuple[str, dict]:
    """The bundle's family and config, from an engine opened as the server will open it (so a bad bundle fails here)."""
    from ..runtime import open_engine

    with open_engine(path) as engine:
        return engine.manifest.get("family"), dict(engine.config)


def engine_argument(arg: str) -> tuple[str | None, Path]:
    """ENGINE or NAME=ENGINE -> (NAME or None, the bundle's resolved path)."""
    name, sep, path = arg.partition("=")
    if not sep or not NAME_PATTERN.match(name):
        name, path = None, arg
    return name, Path(path).resolve()


def plan_models(engines: list[str], options: RepositoryOptions) -> list[ModelSpec]:
    """ENGINE or NAME=ENGINE arguments -> the models to write. NAME replaces `sd3` for an SD3 bundle and the `lemur`
    prefix for a LEMUR one (two bundles of one family need names)."""
    specs: list[ModelSpec] = []
    for arg in engines:
        name, path = engine_argument(arg)
        if not path.is_dir():
            raise ValueError(f"{arg}: not an engine bundle directory (NAME.engine)")
        family, config = _family(path)
        if family == "sd3":
            specs.append(ModelSpec(name or "sd3", "sd3", path, config))
        elif family == "lemur":
            prefix = name or "lemur"
            specs.append(ModelSpec(f"{prefix}_embed", "lemur_embed", path, config))
            if options.bank is not None:
                specs.append(ModelSpec(f"{prefix}_score", "lemur_score", path, config))
        else:
            raise ValueError(f"{arg}: family {family!r} has no Triton model (sd3 and lemur bundles do)")
    seen = set()
    for spec in specs:
        if spec.name in seen:
            raise ValueError(f"two models named {spec.name!r}: name the bundles, NAME=ENGINE (e.g. small={spec.engine.name})")
        seen.add(spec.name)
    return specs


def _tensor(name: str, dtype: str, dims: list[int], optional: bool = False) -> str:
    return (f'  {{ name: "{name}" data_type: TYPE_{dtype} dims: [ {", ".join(str(d) for d in dims)} ]'
            f'{" optional: true" if optional else ""} }}')


def _io(spec: ModelSpec) -> tuple[list[str], list[str]]:
    c = spec.config
    if spec.kind == "sd3":
        d, p = c["joint_attention_dim"], c["pooled_projection_dim"]
        inputs = [_tensor("prompt_embeds", "FP32", [-1, d]), _tensor("pooled_embeds", "FP32", [p]),
                  _tensor("negative_prompt_embeds", "FP32", [-1, d], True), _tensor("negative_pooled_embeds", "FP32", [p], True),
                  _tensor("initial_latents", "FP32", [c["out_channels"], -1, -1], True),
                  _tensor("seed", "UINT64", [1], True), _tensor("guidance_scale", "FP32", [1], True),
                  _tensor("num_steps", "INT32", [1], True), _tensor("shift", "FP32", [1], True),
                  _tensor("height", "INT32", [1], True), _tensor("width", "INT32", [1], True),
                  _tensor("xslim_threshold", "FP32", [1], True), _tensor("xslim", "STRING", [1], True)]
        outputs = [_tensor("latents", "FP32", [c["out_channels"], -1, -1])]
    elif spec.kind == "lemur_embed":
        s = c["image_size"]
        inputs = [_tensor("text_ids", "INT64", [-1]), _tensor("segment_ids", "INT64", [-1], True),
                  _tensor("frames", "FP32", [-1, 3, s, s])]
        outputs = [_tensor("embedding", "FP32", [c["embed_dim"]])]
    else:
        inputs = [_tensor("history_ids", "INT64", [-1]), _tensor("query_ids", "INT64", [-1]),
                  _tensor("skip_missing", "BOOL", [1], True), _tensor("min_model_version", "INT64", [1], True)]
        outputs = [_tensor("score", "FP32", [1])]
    return inputs, outputs


def _quote(text: str) -> str:
    """A protobuf text-format string's body (a path may hold quotes or backslashes)."""
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _server_path(path: Path, options: RepositoryOptions) -> str:
    return str(options.bundle_root / path.name) if options.bundle_root is not None else str(path)


def config_pbtxt(spec: ModelSpec, options: RepositoryOptions) -> str:
    inputs, outputs = _io(spec)
    sd3 = spec.kind == "sd3"
    max_batch = options.sd3_max_batch if sd3 else options.lemur_max_batch
    delay = options.sd3_queue_delay_us if sd3 else options.lemur_queue_delay_us
    parameters = {"engine_path": _server_path(spec.engine, options), "intra_op_threads": str(options.threads),
                  "device": options.device}
    if spec.kind == "lemur_score":
        parameters["bank_path"] = _server_path(options.bank, options)
    from ..runtime import version

    parameters["slimengine_version"] = version()
    params = "\n".join(f'parameters {{ key: "{k}" value: {{ string_value: "{_quote(v)}" }} }}' for k, v in parameters.items())
    kind = "KIND_GPU" if options.device == "cuda" else "KIND_CPU"
    nl = ",\n"
    return (f'# Written by `slimengine triton-repo` ({spec.kind} of {spec.engine.name}); docs/serving.md\n'
            f'name: "{spec.name}"\nbackend: "python"\nmax_batch_size: {max_batch}\n'
            f'input [\n{nl.join(inputs)}\n]\noutput [\n{nl.join(outputs)}\n]\n'
            f'dynamic_batching {{ max_queue_delay_microseconds: {delay} }}\n'
            f'instance_group [ {{ count: {options.instances} kind: {kind} }} ]\n'
            f'{params}\n')


MODEL_PY = '''"""Triton Python-backend model {name!r}: {kind} of the slimengine bundle named in config.pbtxt (docs/serving.md)."""

import triton_python_backend_utils as pb_utils

from slimengine.serving.backend import {cls}


class TritonPythonModel({cls}):
    pb_utils = pb_utils
'''

CLASSES = {"sd3": "SD3Model", "lemur_embed": "LemurEmbedModel", "lemur_score": "LemurScoreModel"}


def write_repository(engines: list[str], out: str | Path, options: RepositoryOptions | None = None, *, force: bool = False,
                     report: Callable[[str], None] | None = None) -> list[ModelSpec]:
    """Write the repository into `out` atomically: built in a temporary sibling directory, then renamed into place; an
    existing `out` is replaced only with `force` (and only once the new one is complete), and only when it is a directory
    that neither is nor holds nor sits in one of the bundles or the bank (OutputPathError, before any bundle is opened:
    staging.output_directory). Temporaries that killed
    runs left beside `out` are removed first, each told to `report`."""
    options = options or RepositoryOptions()
    if options.instances < 1:
        raise ValueError(f"instances must be >= 1, got {options.instances}")
    if options.threads < 0:
        raise ValueError(f"threads must be >= 0 (0: ONNX Runtime's default), got {options.threads}")
    if options.device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {options.device!r}")
    if options.bank is not None:
        options = dataclasses.replace(options, bank=Path(options.bank).resolve())
        if not options.bank.is_file():
            raise ValueError(f"--bank {options.bank}: no such memory bank file (lemur_score opens it read-only; its writer creates it)")
    # --force replaces a repository (a directory) only: never a file, link or device, nor a bundle or bank it serves
    inputs = [engine_argument(arg)[1] for arg in engines] + ([options.bank] if options.bank is not None else [])
    out = output_directory(out, force, inputs)
    specs = plan_models(engines, options)
    if not specs:
        raise ValueError("no models to write: give at least one SD3 or LEMUR bundle")
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temporaries(out):  # left by a triton-repo killed midway (the exporter's mechanism)
        if report is not None:
            report(f"removed stale temporary {stale} of an interrupted triton-repo")
    tmp = temporary_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    lock = None
    try:
        lock = hold_lock(tmp)  # while we run, the next triton-repo to `out` leaves our temporary alone
        for spec in specs:
            (tmp / spec.name / "1").mkdir(parents=True)
            (tmp / spec.name / "config.pbtxt").write_text(config_pbtxt(spec, options))
            (tmp / spec.name / "1" / "model.py").write_text(MODEL_PY.format(name=spec.name, kind=spec.kind, cls=CLASSES[spec.kind]))
        (tmp / LOCK).unlink()  # not part of the repository; until the rename our live PID marks the temporary as in use
        publish(tmp, out, force, writer="triton-repo")  # with force, the old repository is swapped out in one step
    finally:
        if lock is not None:
            os.close(lock)
        shutil.rmtree(tmp, ignore_errors=True)
    return specs
