"""8-bit stage graphs: `export-engine --precision int8` (docs/int8.md has the method and the measurements).

What is quantized: the MatMul nodes with a constant weight in the transformer's stages (embed, joint blocks,
compensation, final). Weights become int8, symmetric, one scale per output channel; activations are quantized to
uint8 per tensor *at run time*, from the values of that call (ONNX Runtime's dynamic quantization:
DynamicQuantizeMatMul / MatMulIntegerToFloat). Run-time scales follow the activations' range as it changes with the
timestep, so no range is fixed at export. Static activation ranges (QDQ) measured slower and less accurate here
(docs/int8.md), and ONNX Runtime's CPU kernels have no int8 attention, softmax or norm: those stay float by construction.

What stays float is measured, stage by stage, on calibration data (the stage's inputs recorded while the PyTorch
program runs on the calibration prompts, at every recorded step): each candidate node is quantized alone and its
the whole stage is quantized and its worst relative L2 error over the calibration inputs measured; if that is above
the tolerance, each candidate node is quantized alone and its error measured, and the most sensitive node still int8
goes back to float until the stage is within the tolerance.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from .stage_spec import StageSpec

QUANTIZED_ROLES = ("embed", "block", "compensate", "final")  # token stages (X-Slim) stay float: docs/int8.md
DEFAULT_TOLERANCE = 0.02  # worst relative L2 error of a stage's outputs against its float32 graph
METHOD = "dynamic-int8"  # int8 per-channel weights, uint8 per-tensor activations quantized at run time


class CalibrationError(ValueError):
    """Unusable calibration input: one line for the user."""


@dataclasses.dataclass
class Calibration:
    """The conditioning the program runs on while stage inputs are recorded: [P, L, J] and [P, D], and the
    negative (empty prompt) conditioning that CFG pairs with it."""

    source: str
    prompt_embeds: torch.Tensor
    pooled_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    negative_pooled_embeds: torch.Tensor | None
    # Calibration from prompts: each text encoder's token ids of the prompts and the empty prompt (role -> [P + 1, L]),
    # tokenized as diffusers does; what the encoders' quantization is measured on. None for an embeddings file.
    token_ids: dict[str, np.ndarray] | None = None


EMBEDDING_KEYS = ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds")
MAX_CALIBRATION_PROMPTS = 64


def load_calibration(path: Path, pipeline_folder: Path | None, max_sequence_length: int, joint_dim: int, pooled_dim: int,
                     cfg: bool, t5_rows_from: int | None = None) -> Calibration:
    """Prompts (a text file, one per line, encoded by the pipeline's own encoders as diffusers does) or an
    embeddings file (.safetensors with EMBEDDING_KEYS; the negative pair is needed when the program uses CFG).
    `t5_rows_from`: a bundle without T5 (--no-t5) feeds zeros from this token on (the CLIP length), as the runtime does."""
    path = Path(path)
    if path.suffix == ".safetensors":
        calib = _embeddings_file(path, cfg)
    else:
        if pipeline_folder is None:
            raise CalibrationError(f"--calibrate {path}: prompts need the pipeline's text encoders (a pipeline folder or --pipeline); "
                                   "without them give an embeddings file (.safetensors with prompt_embeds and pooled_prompt_embeds)")
        from slimengine.distill.data import DataError, encode_prompts, load_encoder_pipeline, read_prompts

        try:
            every = read_prompts(path)
            pipe = load_encoder_pipeline(pipeline_folder)
        except DataError as e:
            raise CalibrationError(f"--calibrate: {e}") from None
        prompts = every[:MAX_CALIBRATION_PROMPTS]
        text, pooled = encode_prompts(pipe, prompts, max_sequence_length)
        neg_text, neg_pooled = encode_prompts(pipe, [""], max_sequence_length) if cfg else (None, None)
        used = f"the first {len(prompts)} of {len(every)} prompts" if len(every) > len(prompts) else f"{len(prompts)} prompts"
        calib = Calibration(f"{path} ({used})", text, pooled, neg_text, neg_pooled,
                            encoder_token_ids(pipe, prompts + [""], max_sequence_length))
        if t5_rows_from is not None:
            for embeds in (calib.prompt_embeds, calib.negative_prompt_embeds):
                if embeds is not None:
                    embeds[:, t5_rows_from:] = 0
    if calib.prompt_embeds.shape[-1] != joint_dim or calib.pooled_embeds.shape[-1] != pooled_dim:
        source = "the pipeline's text encoders give" if path.suffix != ".safetensors" else "embeddings of"
        raise CalibrationError(f"--calibrate {path}: {source} width {calib.prompt_embeds.shape[-1]} / {calib.pooled_embeds.shape[-1]}, "
                               f"the transformer takes {joint_dim} / {pooled_dim}")
    if not calib.prompt_embeds.any():
        raise CalibrationError(f"--calibrate {path}: the prompt embeddings are all zero: nothing to calibrate on")
    return calib


def encoder_token_ids(pipe, prompts: list[str], max_sequence_length: int) -> dict[str, np.ndarray]:
    """Each text encoder stage's input_ids for `prompts`, padded and truncated as diffusers' SD3 pipeline does."""
    tokenizers = {"clip_l": (pipe.tokenizer, pipe.tokenizer_max_length), "clip_g": (pipe.tokenizer_2, pipe.tokenizer_max_length)}
    if pipe.tokenizer_3 is not None:
        tokenizers["t5"] = (pipe.tokenizer_3, max_sequence_length)
    return {role: tok(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="np").input_ids.astype(np.int64)
            for role, (tok, length) in tokenizers.items()}


def _embeddings_file(path: Path, cfg: bool) -> Calibration:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise CalibrationError(f"--calibrate {path}: not a readable safetensors file ({e})") from None
    needed = EMBEDDING_KEYS if cfg else EMBEDDING_KEYS[:2]
    missing = [k for k in needed if k not in tensors]
    if missing:
        raise CalibrationError(f"--calibrate {path}: missing {', '.join(missing)}" + (" (the program uses CFG)" if cfg else ""))
    t = {k: tensors[k].float() for k in needed}  # the negative pair is unused without CFG
    text, pooled = t["prompt_embeds"], t["pooled_prompt_embeds"]
    if text.ndim != 3 or pooled.ndim != 2 or text.shape[0] != pooled.shape[0] or not 1 <= text.shape[0] <= MAX_CALIBRATION_PROMPTS \
            or text.shape[1] < 1:
        raise CalibrationError(f"--calibrate {path}: prompt_embeds must be [P, L, J] and pooled_prompt_embeds [P, D] with the same "
                               f"P from 1 to {MAX_CALIBRATION_PROMPTS} and L >= 1; got {list(text.shape)} and {list(pooled.shape)}")
    neg_text = neg_pooled = None
    if cfg:
        neg_text, neg_pooled = t["negative_prompt_embeds"], t["negative_pooled_prompt_embeds"]
        if neg_text.ndim != 3 or neg_pooled.ndim != 2 or neg_text.shape[1:] != text.shape[1:] or neg_pooled.shape[1:] != pooled.shape[1:] \
                or neg_text.shape[0] != neg_pooled.shape[0] or neg_text.shape[0] not in (1, text.shape[0]):
            raise CalibrationError(f"--calibrate {path}: negative_prompt_embeds must be [1 or P, L, J] and negative_pooled_prompt_embeds "
                                   f"[1 or P, D] like the prompts'; got {list(neg_text.shape)} and {list(neg_pooled.shape)}")
    if not all(torch.isfinite(x).all() for x in t.values()):
        raise CalibrationError(f"--calibrate {path}: holds NaN or infinite values")
    return Calibration(f"{path} ({text.shape[0]} prompts)", text, pooled, neg_text, neg_pooled)


def recorded_steps(steps: int, max_steps: int = 8) -> list[int]:
    """Evenly spaced steps of the program, first and last included, at most `max_steps`."""
    count = min(steps, max_steps)
    return sorted({round(i * (steps - 1) / max(count - 1, 1)) for i in range(count)})


def record_bytes(model, plan, calib: Calibration, latent_size: int, max_steps: int = 8) -> int:
    """What record_stage_inputs will hold: every recorded step's float32 inputs of every quantized stage."""
    c = model.config
    rows = calib.prompt_embeds.shape[0] * (2 if calib.negative_prompt_embeds is not None and plan.guidance_scale > 1 else 1)
    tokens = (latent_size // c.patch_size) ** 2
    text = calib.prompt_embeds.shape[1]
    per_step = (model.num_layers + 2) * (tokens + text + 1) * c.inner_dim + (tokens + text) * c.inner_dim  # blocks, final, compensate
    per_step += c.in_channels * latent_size**2 * 2 + text * c.joint_attention_dim + c.pooled_projection_dim  # embed, final's latents
    return 4 * rows * per_step * len(recorded_steps(plan.steps, max_steps))


def check_memory(model, plan, calib: Calibration, latent_size: int) -> None:
    """Refuse, before any work, a calibration whose recorded inputs would not fit in half of this machine's memory."""
    need = record_bytes(model, plan, calib, latent_size)
    have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    if need > have:
        prompts = calib.prompt_embeds.shape[0]
        fit = prompts * have // need
        raise CalibrationError(f"--calibrate: recording the stages' inputs of {prompts} prompts needs {need / 2**30:.1f} GiB, more than half "
                               f"of this machine's memory ({have / 2**30:.1f} GiB): " + (f"use at most {fit} prompts" if fit else
                               "the model is too large to calibrate here"))


@torch.no_grad()
def record_stage_inputs(model, plan, calib: Calibration, specs: list[StageSpec], latent_size: int, seed: int = 0,
                        max_steps: int = 8) -> dict[str, list[dict[str, np.ndarray]]]:
    """Each quantized stage's float32 inputs, by input name, at the recorded steps of the PyTorch program (the
    plan's steps, CFG and 1.x skipped range; X-Slim off) run on the calibration conditioning from seeded noise."""
    from .reference_sampler import reference_generate

    c = model.config
    keep = set(recorded_steps(plan.steps, max_steps))
    by_role: dict[str, list[StageSpec]] = {}
    for spec in specs:
        if spec.role in QUANTIZED_ROLES:
            by_role.setdefault(spec.role if spec.block is None else f"block_{spec.block}", []).append(spec)
    records: dict[str, list[dict[str, np.ndarray]]] = {s.name: [] for group in by_role.values() for s in group}
    step = [-1]

    def record(key, args):
        if step[0] in keep:
            for spec in by_role.get(key, ()):
                records[spec.name].append({t.name: a.detach().float().numpy().copy() for t, a in zip(spec.inputs, args)})

    embed, block, compensate, final = model.embed, model.block, model.compensate, model.final

    def embed_hook(*args):
        step[0] += 1
        record("embed", args)
        return embed(*args)

    def block_hook(index, *args):
        record(f"block_{index}", args)
        return block(index, *args)

    def compensate_hook(*args):
        record("compensate", args)
        return compensate(*args)

    def final_hook(*args):
        record("final", args)
        return final(*args)

    model.embed, model.block, model.compensate, model.final = embed_hook, block_hook, compensate_hook, final_hook
    try:
        count = calib.prompt_embeds.shape[0]
        latents = torch.randn(count, c.in_channels, latent_size, latent_size, generator=torch.Generator().manual_seed(seed))
        neg = {}
        if calib.negative_prompt_embeds is not None:
            neg = {"negative_prompt_embeds": calib.negative_prompt_embeds.expand(count, -1, -1),
                   "negative_pooled_embeds": calib.negative_pooled_embeds.expand(count, -1)}  # 1 row, or one per prompt
        reference_generate(model, plan, calib.prompt_embeds, calib.pooled_embeds, latents, xslim=None, **neg)
    finally:
        del model.embed, model.block, model.compensate, model.final  # the class's methods again
    return records


@contextlib.contextmanager
def _quiet_quantizer():
    # ORT's quantizer logs a pre-processing hint per call at WARNING on the root logger; the report says what was done.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def candidate_nodes(path: Path) -> list[str]:
    """The MatMul nodes whose second input is a weight (an initializer): what dynamic quantization turns into integer
    matmuls. Gemm nodes (the timestep, pooled and modulation projections: one row per image) are not candidates:
    ONNX Runtime's dynamic quantizer rewrites them into float MatMul + Add, and one row has nothing to gain."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    weights = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in weights]


INTEGER_MATMULS = ("DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger")


def integer_matmuls(path: Path) -> int:
    import onnx

    return sum(n.op_type in INTEGER_MATMULS for n in onnx.load(str(path), load_external_data=False).graph.node)


def node_modules(path: Path) -> dict[str, str]:
    """Node name -> the torch module it was traced from (the exporter's name scopes), for reports a user can read."""
    import ast

    import onnx

    model = onnx.load(str(path), load_external_data=False)
    modules = {}
    for node in model.graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
        try:
            # [..., the module's path, the aten op's name]: the module is the scope before the op
            modules[node.name] = [s for s in ast.literal_eval(scopes) if s][-2] if scopes else ""
        except (ValueError, SyntaxError, IndexError):
            modules[node.name] = ""
    return modules


def quantize_graph(source: Path, target: Path, nodes: list[str]) -> None:
    """Write `source` with `nodes` quantized (int8 per-channel weights, dynamic uint8 activations) to `target`
    (+ target.data), and the tanh-approximate Gelu the quantized MatMul leaves unfused as ONNX Runtime's FastGelu."""
    import onnx
    from onnx import helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="slim-int8-") as tmp:
        raw = Path(tmp) / target.name
        if nodes:
            with _quiet_quantizer():
                quantize_dynamic(str(source), str(raw), op_types_to_quantize=["MatMul"], nodes_to_quantize=list(nodes),
                                 per_channel=True, weight_type=QuantType.QInt8, use_external_data_format=True)
            model = onnx.load(str(raw))
        else:
            model = onnx.load(str(source))
        for i, node in enumerate(model.graph.node):
            approx = next((a.s for a in node.attribute if a.name == "approximate"), b"none")
            if node.op_type == "Gelu" and node.domain in ("", "ai.onnx") and approx == b"tanh":
                model.graph.node[i].CopyFrom(helper.make_node("FastGelu", list(node.input), list(node.output), name=node.name,
                                                              domain="com.microsoft"))
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        target.unlink(missing_ok=True)
        Path(str(target) + ".data").unlink(missing_ok=True)
        onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=target.name + ".data")


class StageRunner:
    """Runs one stage graph on recorded inputs in ONNX Runtime (the CPU kernels the engine uses)."""

    def __init__(self, path: Path, threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(self, inputs: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
        return [self.session.run(None, feed) for feed in inputs]


def relative_error(got: list[list[np.ndarray]], expected: list[list[np.ndarray]]) -> float:
    """Worst relative L2 error over records and outputs."""
    worst = 0.0
    for g_outs, e_outs in zip(got, expected):
        for g, e in zip(g_outs, e_outs):
            norm = float(np.linalg.norm(e.astype(np.float64)))
            err = float(np.linalg.norm(g.astype(np.float64) - e))
            worst = max(worst, err / norm if norm > 0 else (0.0 if err == 0 else float("inf")))
    return worst


@dataclasses.dataclass
class StageQuantization:
    int8_nodes: list[str]
    float_nodes: list[str]  # candidates kept float because quantizing them cost more than the tolerance allows
    error: float  # worst relative L2 error of the stage's outputs on the calibration inputs
    error_all_int8: float  # ... with every candidate quantized (what keeping nodes float bought)
    sensitivity: dict[str, float]  # each candidate's error when quantized alone (measured only when all-int8 missed the tolerance)
    modules: dict[str, str]  # node -> the torch module it computes

    def to_json(self) -> dict:
        return {"int8_nodes": len(self.int8_nodes),
                "float_nodes": [{"node": n, "module": self.modules.get(n, ""), "error_alone": self.sensitivity[n]} for n in self.float_nodes],
                "error": self.error, "error_all_int8": self.error_all_int8}


def quantize_stage(path: Path, inputs: list[dict[str, np.ndarray]], tolerance: float, threads: int = 0) -> StageQuantization:
    """Quantize the stage graph at `path` in place (module docstring: sensitivity, then float nodes until the
    stage's error on `inputs` is within `tolerance`)."""
    candidates = candidate_nodes(path)
    modules = node_modules(path)
    expected = StageRunner(path, threads).run(inputs)
    if not all(np.isfinite(o).all() for outs in expected for o in outs):
        raise CalibrationError(f"stage {path.stem}: the float32 program gives NaN or infinite values on the calibration inputs "
                               "(embeddings far outside what the model takes?): nothing to measure quantization against")
    with tempfile.TemporaryDirectory(prefix="slim-int8-") as tmp:
        trial = Path(tmp) / path.name

        def error_with(nodes: list[str]) -> float:
            quantize_graph(path, trial, nodes)
            return relative_error(StageRunner(trial, threads).run(inputs), expected)

        error_all = error = error_with(candidates)
        sensitivity: dict[str, float] = {}
        kept: list[str] = []
        if not error <= tolerance:  # (NaN included) only then is each node's own error worth measuring (one quantization per candidate)
            sensitivity = {n: error_with([n]) for n in candidates}
            order = sorted(candidates, key=lambda n: (-sensitivity[n], candidates.index(n)))
            while not error <= tolerance and len(kept) < len(order):
                kept.append(order[len(kept)])
                error = error_with([n for n in candidates if n not in kept])
        quantized = [n for n in candidates if n not in kept]  # what the last error_with wrote to `trial`
        if integer_matmuls(trial) != len(quantized):  # the report and manifest count what the graph holds
            raise RuntimeError(f"stage {path.stem}: {len(quantized)} matmuls were to be int8, the quantized graph holds "
                               f"{integer_matmuls(trial)}")
        shutil.move(str(trial), str(path))
        shutil.move(str(trial) + ".data", str(path) + ".data")
    return StageQuantization(quantized, kept, error, error_all, sensitivity, modules)


def report_line(name: str, q: StageQuantization) -> str:
    """The export report's line for one quantized stage."""
    kept = f"; float: {', '.join(q.modules.get(n) or n for n in q.float_nodes)}" if q.float_nodes else ""
    return (f"int8 {name:>12}: {len(q.int8_nodes)} of {len(q.int8_nodes) + len(q.float_nodes)} matmuls int8, "
            f"error {q.error:.4f} (all int8: {q.error_all_int8:.4f}){kept}")


def finish_record(record: dict, specs: list[StageSpec]) -> dict:
    """Complete a bundle's `quantization` record: `float_stages` names every stage without an int8 matmul (never
    quantized, or every candidate kept float). Refuses a bundle in which nothing ended up int8: it would say int8
    and compute in float32."""
    record["float_stages"] = [s.name for s in specs if record["stages"].get(s.name, {}).get("int8_nodes", 0) == 0]
    if not any(st["int8_nodes"] for st in record["stages"].values()):
        raise CalibrationError(f"no matmul stays within --int8-tolerance {record['tolerance']:g} in 8 bits: the bundle would compute "
                               "in float32 only; raise the tolerance, or export fp32")
    return record


def quantize_stages(directory: Path, specs: list[StageSpec], records: dict[str, list[dict[str, np.ndarray]]], tolerance: float,
                    progress=None, threads: int = 0) -> dict[str, StageQuantization]:
    """Quantize every stage of QUANTIZED_ROLES under `directory` in place; `records` from record_stage_inputs."""
    result = {}
    for spec in specs:
        if spec.role not in QUANTIZED_ROLES:
            continue
        if not records.get(spec.name):
            raise CalibrationError(f"stage {spec.name} never ran on the calibration program: nothing to measure its quantization on")
        result[spec.name] = quantize_stage(Path(directory) / spec.file, records[spec.name], tolerance, threads)
        if progress is not None:
            progress(f"int8 {spec.name}")
    return result


def fold_weight_transposes(path: Path) -> int:
    """Rewrite MatMul(x, Transpose(W)) with initializer W as MatMul(x, Wᵀ) stored as an initializer, in place: the T5
    stage is traced unoptimized (t5_export.py), so its weights reach the MatMuls through Transpose nodes, which dynamic
    quantization cannot see through. ONNX Runtime folds the same Transpose at load, so the float math is unchanged.
    Returns how many were folded."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    folded, keep = 0, []
    for node in graph.node:
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        source = weights.get(node.input[0]) if node.op_type == "Transpose" and node.input else None
        if source is not None and len(source.dims) == 2 and perm in (None, [1, 0]):
            transposed = numpy_helper.from_array(numpy_helper.to_array(source).T.copy(), node.output[0])
            graph.initializer.append(transposed)
            consumers[source.name] -= 1
            folded += 1
        else:
            keep.append(node)
    if not folded:
        return 0
    del graph.node[:]
    graph.node.extend(keep)
    unused = [i for i in graph.initializer if consumers.get(i.name, 0) == 0 and i.name in weights]
    for init in unused:
        graph.initializer.remove(init)
    Path(str(path) + ".data").unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data")
    return folded


ENCODER_ROLES = ("clip_l", "clip_g", "t5")
MAX_ENCODER_BYTES = 4 << 30  # quantize_dynamic holds a graph's float weights and their int8 copy in memory (T5-XXL: 19 GB)


def quantize_encoders(directory: Path, specs: list[StageSpec], calib: Calibration, tolerance: float, report, progress=None,
                      batch: int = 8) -> dict[str, StageQuantization]:
    """Quantize the text encoder stages under `directory` in place, measured on the calibration prompts' token ids (the
    same rule as the transformer's stages). The VAE stays float32 (docs/int8.md); so do encoders calibration cannot run
    (an embeddings file has no prompts) and those too large to quantize in memory."""
    if calib.token_ids is None:
        report("int8 text encoders: float32 (calibration by embeddings has no prompts to run them on)")
        return {}
    result = {}
    for spec in specs:
        if spec.role not in ENCODER_ROLES or spec.role not in calib.token_ids:
            continue
        path = Path(directory) / spec.file
        size = path.stat().st_size + (Path(str(path) + ".data").stat().st_size if Path(str(path) + ".data").exists() else 0)
        if size > MAX_ENCODER_BYTES:
            report(f"int8 {spec.name:>12}: float32 ({size / 2**30:.1f} GiB: quantizing it needs that twice in memory)")
        else:
            fold_weight_transposes(path)
            ids = calib.token_ids[spec.role]
            feeds = [{"input_ids": ids[i:i + batch]} for i in range(0, len(ids), batch)]
            result[spec.name] = quantize_stage(path, feeds, tolerance)
            report(report_line(spec.name, result[spec.name]))
        if progress is not None:  # one step of the bar per encoder, quantized or not
            progress(f"int8 {spec.name}")
    return result


@torch.no_grad()
def verify_program(bundle: Path, model, plan, calib: Calibration, latent_size: int, prompts: int = 4, seed: int = 1) -> tuple[float, float]:
    """The bundle's whole program (the engine) against the float32 PyTorch program on up to `prompts` calibration prompts
    from seeded noise: relative L2 error of the final latents, and their PSNR (peak: the reference's value range)."""
    import slimengine as se

    from .reference_sampler import reference_generate

    c = model.config
    n = min(prompts, calib.prompt_embeds.shape[0])
    latents = torch.randn(n, c.in_channels, latent_size, latent_size, generator=torch.Generator().manual_seed(seed))
    text, pooled = calib.prompt_embeds[:n], calib.pooled_embeds[:n]
    neg = {}
    if calib.negative_prompt_embeds is not None:
        neg = {"negative_prompt_embeds": calib.negative_prompt_embeds[:n].expand(n, -1, -1).contiguous(),
               "negative_pooled_embeds": calib.negative_pooled_embeds[:n].expand(n, -1).contiguous()}
    expected = reference_generate(model, plan, text, pooled, latents, xslim=None, **neg).latents.numpy().astype(np.float64)
    with se.open_engine(bundle) as engine, engine.session() as session:
        got = session.generate(text.numpy(), pooled.numpy(), latents=latents.numpy(), xslim="none",
                               **{k: v.numpy() for k, v in neg.items()}).latents
    got = np.asarray(got, dtype=np.float64)
    error = float(np.linalg.norm(got - expected) / np.linalg.norm(expected))
    mse = float(np.mean((got - expected) ** 2))
    peak = float(expected.max() - expected.min())
    return error, float("inf") if mse == 0 else 10 * float(np.log10(peak**2 / mse))
