"""profile-engine: where the milliseconds of an engine go: SD3 by stage, step and block; LEMUR by call, stage and bank work.

    profile-engine SD3.engine [--warmup N] [--iters N] [--batch B] [--resolution R] [--xslim POLICY]
                              [--prompt TEXT [--negative TEXT]] [--json F] [--trace F] [--plot F]
    profile-engine LEMUR.engine [--program embed|score|both] [--batch B] [--history H] [--warmup N] [--iters N]
                                [--json F] [--trace F] [--plot F]
    profile-engine --compare A.json B.json

Every time comes from the runtime's own event records (Session.profiling, slim_session_event): one
per stage call, step and generation (SD3), per embed/score call, stage call and bank work (LEMUR),
read with the host's steady clock around each backend call. For SD3 the baseline plan of the same
weights (28 steps x 2 CFG, every block every step) is timed in the same run, iterations interleaved
with the engine's own, through the runtime's plan override (slim_generate_params.num_steps); LEMUR
has no such plan. With --prompt (bundles with pipeline stages), each generation is prompt to image
(Session.generate(prompt=...), the runtime's slim_generate_prompt): its tokenize, encoder and VAE phases, recorded
by the runtime as events (ImageResult.spans), join the sampling's events on one timeline. The JSON schema is
documented in docs/profile-engine.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

import slimengine as se
from slimengine.bundle import loads_strict
from slimengine.staging import OutputPathError, output_file, write_file_atomically
from slimengine.xslim_policy import parse_xslim_spec

SCHEMA = "slimengine-profile"
SCHEMA_VERSION = 2  # 2 (1.0): settings.xslim (was cache), step level skipped_range (was cached_range)
BASELINE_STEPS, BASELINE_SHIFT, BASELINE_GUIDANCE = 28, 3.0, 7.0  # plain SD3 (export/sampling_plan.py make_plan)
DEFAULT_TEXT_LEN = 333  # SD3: 77 CLIP + 256 T5 tokens
PERCENTILES = (90, 95, 99)
PLOT_SIZE_PX = (1200, 1400)  # width, height of the --plot PNG
LEMUR_PROGRAMS = ("embed", "score")
DEFAULT_HISTORY = 256
FILL_BATCH = 256  # documents per untimed embed call that fills the bank for the score histories
BANK_WORK = {"embed": "bank upsert", "score": "bank history assembly"}  # what a program's SLIM_EVENT_BANK times
ITEMS_PER_S = {"embed": "documents_per_s", "score": "scores_per_s"}  # a call's throughput x batch
LEMUR_BASELINE_NOTE = ("a LEMUR bundle has no reference plan of the same weights to time against (SD3's baseline is its "
                       "28-step CFG plan); compare two reports with --compare")
SD3_ONLY, LEMUR_ONLY = ("text_len", "resolution", "xslim", "prompt", "negative"), ("program", "history")
PROMPT_PHASES = ("tokenize", "clip_l", "clip_g", "t5", "vae_decode")  # ImageResult.spans' stages, in pipeline order
PIPELINE_COLOURS = {"tokenize": "tab:gray", "clip_l": "tab:pink", "clip_g": "tab:pink", "t5": "tab:pink", "vae_decode": "tab:brown"}
LEVEL_COLOURS = {"full": "tab:red", "skipped_range": "tab:orange", "reused": "tab:green", "block_refresh": "tab:cyan",
                 "token_refresh": "tab:olive"}


class UsageError(Exception):
    """A bad argument or input file: one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="profile-engine",
        description="Profile an engine bundle in the slimengine runtime from the runtime's own event records: SD3, latency "
        "statistics per generation, step, stage and block and the speedup over the 28-step CFG baseline of the same weights; "
        "LEMUR, per embed/score call, stage and bank work with documents/s and scores/s. A Chrome trace and plots.",
    )
    parser.add_argument("engine", nargs="?", type=Path, help="engine bundle directory (NAME.engine)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed generations (LEMUR: calls of each program) first (default 2)")
    parser.add_argument("--iters", type=int, default=10, help="timed generations (LEMUR: calls of each program) (default 10)")
    parser.add_argument("--batch", type=int, default=1, help="prompts per generation; LEMUR: documents per embed, histories per "
                        "score (default 1)")
    parser.add_argument("--resolution", help="SD3: latent size R or HxW, as slim_generate takes it (SD3's VAE: 128 for 1024 px); "
                        "default: the bundle's default_latent_size")
    parser.add_argument("--text-len", type=int, help=f"SD3: text tokens (default {DEFAULT_TEXT_LEN}, SD3's)")
    parser.add_argument("--xslim", help="SD3: X-Slim policy (docs/xslim.md): none, xslim:step=T[,critical=C,refresh=block|token,...] "
                        "or xslim:schedule=FILE.json (default: the bundle's own policy)")
    parser.add_argument("--prompt", help="SD3 with pipeline stages: profile prompt to image (tokenize, text encoders, steps, "
                        "VAE decode) for this prompt; --resolution stays in latent pixels")
    parser.add_argument("--negative", help="SD3, with --prompt: the negative prompt for CFG (default \"\")")
    parser.add_argument("--no-baseline", action="store_true", help="SD3: skip the 28-step CFG baseline (no speedup figure)")
    parser.add_argument("--program", choices=(*LEMUR_PROGRAMS, "both"), help="LEMUR: the program(s) to time (default both)")
    parser.add_argument("--history", type=int, help=f"LEMUR: history length of each score row (default {DEFAULT_HISTORY})")
    parser.add_argument("--json", type=Path, help="write the report as JSON (schema: docs/profile-engine.md)")
    parser.add_argument("--trace", type=Path, help="write a Chrome-trace JSON (open it in ui.perfetto.dev or chrome://tracing)")
    parser.add_argument("--plot", type=Path, help="write a PNG: time per stage, per-step timeline by step level, per-block heatmap")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"), help="compare two --json reports: ratios B/A")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.compare:
            if args.engine:
                raise UsageError("--compare takes two JSON reports and no engine")
            print(compare_table(*(load_report(p) for p in args.compare), *args.compare))
            return 0
        check_arguments(args)
        manifest = read_manifest(args.engine)
        family = manifest.get("family")
        if family not in ("sd3", "lemur"):
            raise UsageError(f"{args.engine}: model family {family!r} is not supported (expected sd3 or lemur)")
        for name in SD3_ONLY if family == "lemur" else LEMUR_ONLY:
            if getattr(args, name) is not None:
                raise UsageError(f"--{name.replace('_', '-')} applies to {'sd3' if family == 'lemur' else 'lemur'} engines; "
                                 f"{args.engine} is a {family} engine")
        report, trace = profile_sd3(args) if family == "sd3" else profile_lemur(args)
        print(report_table(report))
        if args.json:
            write_file_atomically(args.json, lambda tmp: tmp.write_text(json.dumps(report, indent=1) + "\n"))
        if args.trace:
            write_file_atomically(args.trace, lambda tmp: tmp.write_text(json.dumps(trace) + "\n"))
        if args.plot:
            write_file_atomically(args.plot, lambda tmp: write_plot(report, trace, tmp))
    except (UsageError, OutputPathError) as e:
        return _fail(str(e))
    except se.SlimError as e:  # the engine loaded but a generation failed
        return _fail(f"{args.engine}: {e}", code=1)
    except OSError as e:
        return _fail(f"cannot write {e.filename}: {e.strerror}", code=1)
    return 0


def _fail(message: str, code: int = 2) -> int:
    print(f"profile-engine: error: {message}", file=sys.stderr)
    return code


# ---- arguments and inputs ----


def check_arguments(args) -> None:
    if args.engine is None:
        raise UsageError("an engine bundle is required (or --compare A.json B.json)")
    for name in ("iters", "batch", "text_len", "history"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be 0 or more, got {args.warmup}")
    if args.negative is not None and args.prompt is None:
        raise UsageError("--negative goes with --prompt")
    if args.prompt is not None and args.text_len is not None:
        raise UsageError("--text-len and --prompt: with a prompt the text length is the bundle's tokenizers' (77 CLIP + "
                         "max_sequence_length T5 tokens); drop --text-len")
    if args.plot and args.plot.suffix.lower() != ".png":
        raise UsageError(f"--plot writes a PNG: give a .png file name, got {args.plot}")
    for name in ("json", "trace", "plot"):  # before profiling: never a device, FIFO, socket, directory or a link to nothing
        if getattr(args, name) is not None:
            output_file(getattr(args, name), inputs=[args.engine] if args.engine is not None else [])  # never into the bundle


def read_manifest(path: Path) -> dict:
    """The bundle's manifest.json, read only to pick the model family's profiler (the runtime validates it)."""
    if not path.exists():
        raise UsageError(f"no such engine: {path}")
    file = path / "manifest.json"
    if file.is_symlink() or (file.exists() and not file.is_file()):  # never opened: a FIFO would block the read
        raise UsageError(f"{file} is not a regular file")
    try:
        manifest = loads_strict(file.read_bytes())
    except FileNotFoundError:
        raise UsageError(f"{path} is not an engine bundle (no manifest.json)") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}/manifest.json cannot be read: {e}") from None
    if not isinstance(manifest, dict):
        raise UsageError(f"{path}/manifest.json is not a bundle manifest (not a JSON object)")
    return manifest


def latent_size(text: str | None, config: dict) -> tuple[int, int]:
    if text is None:
        return config["default_latent_size"], config["default_latent_size"]
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    patch, limit = config["patch_size"], config["max_latent_size"]
    if len(parts) != 2 or not all(0 < p <= limit and p % patch == 0 for p in parts):
        raise UsageError(f"--resolution {text}: give a latent size R or HxW, multiples of {patch} up to {limit}")
    return parts[0], parts[1]


def xslim_request(spec: str | None, program: dict) -> dict:
    """Session.generate arguments for an --xslim policy (None: the bundle's own). The one place a policy
    becomes runtime parameters; the policy syntax is slimengine.xslim_policy's (docs/xslim.md)."""
    if spec is None:
        return {}
    try:
        parse_xslim_spec(spec, steps=len(program["steps"]))
    except ValueError as e:
        raise UsageError(f"--xslim {spec}: {e}") from None
    return {"xslim": spec}


# ---- measuring ----


def profile_sd3(args) -> tuple[dict, dict]:
    """Time the bundle's program (and the baseline plan) and summarise; returns (report, trace)."""
    try:
        engine = se.open_engine(args.engine)  # validates the manifest
    except se.SlimError as e:
        raise UsageError(f"{args.engine}: {e}") from None
    config, program = engine.config, engine.manifest["program"]
    height, width = latent_size(args.resolution, config)
    xslim = xslim_request(args.xslim, program)
    pipeline = engine.manifest.get("pipeline")
    if args.prompt is not None:
        missing = [r for r in ("clip_l", "clip_g", "vae_decode") if r not in engine.stage_names]
        if pipeline is None or missing:
            raise UsageError(f"--prompt: {args.engine} has no pipeline stages (text encoders and VAE); export the pipeline folder "
                             "with export-engine PIPELINE_FOLDER (or a checkpoint with --pipeline FOLDER), or profile it without --prompt")
        text_len = pipeline["clip_length"] + pipeline["max_sequence_length"]
        factor = pipeline["vae"]["scale_factor"]
        text = pooled = None
        inputs = dict(prompt=[args.prompt] * args.batch, negative_prompt=[args.negative or ""] * args.batch, seed=0,
                      height=height * factor, width=width * factor)
    else:
        text_len = args.text_len or DEFAULT_TEXT_LEN
        rng = np.random.default_rng(0)
        text, neg_text = rng.standard_normal((2, args.batch, text_len, config["joint_attention_dim"]), dtype=np.float32)
        pooled, neg_pooled = rng.standard_normal((2, args.batch, config["pooled_projection_dim"]), dtype=np.float32)
        inputs = dict(negative_prompt_embeds=neg_text, negative_pooled_embeds=neg_pooled, seed=0, height=height, width=width)
    guidance = program["guidance_scale"]
    baseline_guidance = guidance if guidance > 1 else BASELINE_GUIDANCE
    plans = {"engine": dict(inputs, **xslim)}
    if not args.no_baseline:
        plans["baseline"] = dict(inputs, num_steps=BASELINE_STEPS, shift=BASELINE_SHIFT, guidance_scale=baseline_guidance,
                                 xslim="none")
    sessions = {name: engine.session() for name in plans}
    for session in sessions.values():
        session.profiling = True
    runs = {name: [] for name in plans}
    calls = {name: [] for name in plans}  # prompt mode: (start_ns, end_ns) of each generate(prompt=...) call
    from tqdm import tqdm

    with tqdm(total=(args.warmup + args.iters) * len(plans), desc="profile", unit="gen", disable=args.quiet, file=sys.stderr) as bar:
        for i in range(args.warmup + args.iters):
            for name, kwargs in plans.items():  # interleaved, so drift on a shared machine hits both alike
                if args.prompt is not None:
                    sessions[name].clear_prompt_cache()  # every generation encodes its prompts: the encoders are profiled
                start = time.monotonic_ns()  # the runtime events' clock (the host's steady clock)
                result = sessions[name].generate(text, pooled, **kwargs)
                end = time.monotonic_ns()
                if i >= args.warmup:
                    runs[name].append(result)
                    calls[name].append((start, end))
                bar.update()
    stage_names = engine.stage_names
    report = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "family": "sd3",
        "engine": {"path": str(args.engine), "family": engine.manifest["family"], "precision": engine.manifest["precision"],
                   "num_layers": config["num_layers"], "stages": stage_names, "runtime_version": se.version(),
                   "quantization": engine.manifest.get("quantization")},
        "settings": {"warmup": args.warmup, "iters": args.iters, "batch": args.batch, "latent_size": [height, width],
                     "text_len": text_len, "xslim": args.xslim or "bundle", "guidance_scale": guidance, "seed": 0,
                     "device": "cpu", "device_time": False},
        **summarize(runs["engine"], config["num_layers"], args.batch),
        "prompt": None if args.prompt is None else summarize_prompt(runs["engine"], calls["engine"], args,
                                                                             (inputs.get("height"), inputs.get("width"))),
        "baseline": None,
        "speedup": None,
    }
    if "baseline" in runs:
        base = summarize(runs["baseline"], config["num_layers"], args.batch)
        report["baseline"] = {"plan": f"{BASELINE_STEPS} steps x 2 CFG, every block every step", "steps": BASELINE_STEPS,
                              "shift": BASELINE_SHIFT, "guidance_scale": baseline_guidance, "effective_nfe": base["effective_nfe"],
                              "generation": base["generation"]}
        report["speedup"] = {stat: base["generation"][stat] / report["generation"][stat] for stat in ("mean", "median")}
    return report, chrome_trace(runs, stage_names, args.engine.name, calls if args.prompt is not None else None)


def profile_lemur(args) -> tuple[dict, dict]:
    """Time the LEMUR programs (embed, score) on random documents and a temporary bank; returns (report, trace).

    Untimed first: the bank is filled with batch x history documents, so every score row is a full
    history of distinct ids. Timed: embed calls of `batch` new documents at the config's text length
    and frame count, upserted into the bank; score calls of `batch` histories of `history` ids drawn
    from the filled documents, with queries of the config's query length. Programs are interleaved
    call by call."""
    try:
        engine = se.open_engine(args.engine)  # validates the manifest
    except se.SlimError as e:
        raise UsageError(f"{args.engine}: {e}") from None
    c = engine.config
    programs = LEMUR_PROGRAMS if args.program in (None, "both") else (args.program,)
    batch, history = args.batch, args.history or DEFAULT_HISTORY
    if batch > c["max_batch"]:
        raise UsageError(f"--batch {batch}: this engine takes at most {c['max_batch']} per call")
    if history > c["max_history"]:
        raise UsageError(f"--history {history}: this engine takes histories of at most {c['max_history']} documents")
    text_len, frames, query_len, size = c["max_text_len"], c["max_frames"], c["max_query_len"], c["image_size"]
    rng = np.random.default_rng(0)

    def documents(n: int) -> dict:
        return dict(text_ids=rng.integers(1, c["vocab_size"], (n, text_len)), segment_ids=rng.integers(0, c["num_segments"], (n, text_len)),
                    frames=rng.standard_normal((n, frames, 3, size, size), dtype=np.float32))

    filled = batch * history if "score" in programs else 0
    session = engine.session()
    runs = {name: [] for name in programs}
    from tqdm import tqdm

    fill_batch = min(FILL_BATCH, c["max_batch"])
    with tempfile.TemporaryDirectory(prefix="profile-engine-") as tmp, se.MemoryBank(Path(tmp) / "profile.bank", c["embed_dim"]) as bank:
        calls = -(-filled // fill_batch) + (args.warmup + args.iters) * len(programs)
        with tqdm(total=calls, desc="profile", unit="call", disable=args.quiet, file=sys.stderr) as bar:
            for start in range(0, filled, fill_batch):  # untimed: the documents the histories refer to
                ids = np.arange(start, min(start + fill_batch, filled))
                session.embed(**documents(ids.size), bank=bank, document_ids=ids)
                bar.update()
            session.profiling = True
            for i in range(args.warmup + args.iters):
                for name in programs:  # interleaved, so drift on a shared machine hits both alike
                    if name == "embed":
                        ids = filled + i * batch + np.arange(batch)  # new documents: each upsert is an insert
                        result = session.embed(**documents(batch), bank=bank, document_ids=ids)
                    else:
                        history_ids = rng.permutation(filled).reshape(batch, history)
                        result = session.score(bank, history_ids, rng.integers(1, c["vocab_size"], (batch, query_len)))
                    if i >= args.warmup:
                        runs[name].append(result)
                    bar.update()
    report = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "family": "lemur",
        "engine": {"path": str(args.engine), "family": "lemur", "precision": engine.manifest["precision"], "embed_dim": c["embed_dim"],
                   "stages": engine.stage_names, "runtime_version": se.version(), "quantization": engine.manifest.get("quantization")},
        "settings": {"warmup": args.warmup, "iters": args.iters, "programs": list(programs), "batch": batch, "history": history,
                     "text_len": text_len, "frames": frames, "query_len": query_len, "bank_documents": filled, "seed": 0,
                     "device": "cpu", "device_time": False},
        "programs": {name: summarize_lemur(results, name, batch) for name, results in runs.items()},
        "baseline": None,
        "baseline_note": LEMUR_BASELINE_NOTE,
    }
    return report, lemur_trace(runs, engine.stage_names, args.engine.name)


def _ms(event: dict) -> float:
    return (event["end_ns"] - event["start_ns"]) / 1e6


def latency_stats(samples_ms) -> dict:
    """trtexec-style statistics of samples in ms; throughput = samples per second of their summed time."""
    a = np.asarray(samples_ms, dtype=np.float64)
    stats = {"count": int(a.size), "min": float(a.min()), "mean": float(a.mean()), "median": float(np.median(a))}
    stats.update({f"p{p}": float(np.percentile(a, p)) for p in PERCENTILES})
    stats["max"] = float(a.max())
    stats["throughput_per_s"] = a.size / a.sum() * 1e3 if a.sum() > 0 else math.inf
    return stats


def device_stats(events: list[dict]):
    """Statistics of the events' device times, or None where any was not measured (the CPU backend)."""
    if not events or any(e["device_ns"] is None for e in events):
        return None
    return latency_stats([e["device_ns"] / 1e6 for e in events])


def call_stats(events: list[dict], iters: int, parent_mean_ms: float, per: str = "generation") -> dict:
    """Per-call statistics of events, and their time per parent (`per`: a generation, or a LEMUR call) as a
    share of the parent's mean time."""
    per_parent = sum(_ms(e) for e in events) / iters
    return {f"calls_per_{per}": len(events) / iters, f"per_{per}_ms": per_parent, "share": per_parent / parent_mean_ms,
            **latency_stats([_ms(e) for e in events]), "device": device_stats(events)}


def summarize(results: list, num_layers: int, batch: int) -> dict:
    """The report's measurement sections for one plan's timed generations (GenerateResult with events)."""
    iters = len(results)
    generations = [next(e for e in r.events if e["kind"] == "generation") for r in results]
    gen = dict(latency_stats([_ms(e) for e in generations]), device=device_stats(generations))
    gen["images_per_s"] = gen["throughput_per_s"] * batch
    gen_mean = gen["mean"]
    stage_events = [e for r in results for e in r.events if e["kind"] == "stage"]
    step_events = [e for r in results for e in r.events if e["kind"] == "step"]

    steps = []
    for index in sorted({e["step"] for e in step_events}):
        events = [e for e in step_events if e["step"] == index]
        levels = Counter(e["level"] for e in events)
        steps.append({"index": index, "level": levels.most_common(1)[0][0], "levels": dict(levels),
                      "sigma": results[0].stats["per_step"][index]["sigma"],
                      "blocks_run": float(np.mean([r.stats["per_step"][index]["blocks_run"] for r in results])),
                      **latency_stats([_ms(e) for e in events]), "device": device_stats(events)})

    by_stage, by_block = {}, {}
    for e in stage_events:
        by_stage.setdefault(e["stage"], []).append(e)
        if e["block"] >= 0:
            by_block.setdefault(e["block"], []).append(e)

    heatmap = [[None] * num_layers for _ in steps]
    for e in stage_events:
        if e["block"] >= 0:
            row = heatmap[e["step"]]
            row[e["block"]] = (row[e["block"]] or 0.0) + _ms(e) / iters
    prepares = [next(e for e in r.events if e["kind"] == "prepare") for r in results]
    other = [_ms(g) - _ms(p) - sum(_ms(e) for e in r.events if e["kind"] == "stage") for g, p, r in zip(generations, prepares, results)]
    return {
        "generation": gen,
        "effective_nfe": float(np.mean([r.stats["effective_nfe"] for r in results])),
        "steps": steps,
        "stages": {name: {"block": events[0]["block"], **call_stats(events, iters, gen_mean)} for name, events in by_stage.items()},
        "blocks": [{"index": b, **call_stats(by_block[b], iters, gen_mean)} for b in sorted(by_block)],
        "block_heatmap_ms": heatmap,
        "prepare": dict(latency_stats([_ms(p) for p in prepares]), share=float(np.mean([_ms(p) for p in prepares])) / gen_mean,
                        device=device_stats(prepares)),
        "other_host": dict(latency_stats(other), share=float(np.mean(other)) / gen_mean),
    }


def summarize_prompt(results: list, calls: list, args, image_size: tuple[int, int]) -> dict:
    """Prompt mode's section: the generate(prompt=...) call ("image": prompt to image) and its phases, from the
    ImageResult spans (tokenize, clip_l, clip_g, t5, vae_decode) and the sampling call (the runtime's generation event)."""
    iters = len(results)
    image = latency_stats([(end - start) / 1e6 for start, end in calls])
    image["images_per_s"] = image["throughput_per_s"] * args.batch
    phases = {}
    for phase in PROMPT_PHASES:
        spans = [dict(span, device_ns=None) for r in results for span in r.spans if span["stage"] == phase]
        if spans:
            phases[phase] = call_stats(spans, iters, image["mean"])
    sampling = [dict(next(e for e in r.events if e["kind"] == "generation")) for r in results]
    phases["steps"] = call_stats(sampling, iters, image["mean"])
    phases = {name: phases[name] for name in (*PROMPT_PHASES[:-1], "steps", "vae_decode") if name in phases}  # pipeline order
    covered = [sum(_ms(e) for e in r.events if e["kind"] == "generation") + sum(_ms(s) for s in r.spans) for r in results]
    other = [(end - start) / 1e6 - c for (start, end), c in zip(calls, covered)]
    return {"prompt": args.prompt, "negative_prompt": args.negative or "", "prompt_cache": "cleared before each generation",
            "image_size": list(image_size),
            "image": image, "phases": phases, "other_host": dict(latency_stats(other), share=float(np.mean(other)) / image["mean"])}


def summarize_lemur(results: list, program: str, batch: int) -> dict:
    """The report's section for one LEMUR program's timed calls (EmbedResult / ScoreResult with events)."""
    iters = len(results)
    calls = [next(e for e in r.events if e["kind"] == "generation") for r in results]
    call = dict(latency_stats([_ms(e) for e in calls]), device=device_stats(calls))
    call[ITEMS_PER_S[program]] = call["throughput_per_s"] * batch
    by_stage = {}
    for e in (e for r in results for e in r.events if e["kind"] == "stage"):
        by_stage.setdefault(e["stage"], []).append(e)
    bank = [e for r in results for e in r.events if e["kind"] == "bank"]
    other = [_ms(g) - sum(_ms(e) for e in r.events if e["kind"] in ("stage", "bank")) for g, r in zip(calls, results)]
    return {
        "batch": batch,
        "call": call,
        "stages": {name: call_stats(events, iters, call["mean"], per="call") for name, events in by_stage.items()},
        "bank": dict(call_stats(bank, iters, call["mean"], per="call"), work=BANK_WORK[program]),
        "other_host": dict(latency_stats(other), share=float(np.mean(other)) / call["mean"]),
    }


# ---- outputs ----


def _trace_event(name: str, cat: str, event: dict, tid: int, origin: int, args: dict) -> dict:
    """One runtime event as a Chrome complete ("X") event, in microseconds since `origin` (ns)."""
    if event["device_ns"] is not None:
        args["device_us"] = event["device_ns"] / 1e3
    return {"name": name, "cat": cat, "ph": "X", "pid": 1, "tid": tid, "ts": (event["start_ns"] - origin) / 1e3,
            "dur": (event["end_ns"] - event["start_ns"]) / 1e3, "args": args}


def _trace_header(runs: dict, title: str) -> tuple[list, int]:
    """The process and thread names (one thread per plan or program, from 1) and the time origin (ns)."""
    origin = min(e["start_ns"] for results in runs.values() for r in results for e in r.events)
    trace = [{"ph": "M", "pid": 1, "tid": 0, "name": "process_name", "args": {"name": f"profile-engine {title}"}}]
    trace += [{"ph": "M", "pid": 1, "tid": tid, "name": "thread_name", "args": {"name": name}} for tid, name in enumerate(runs, start=1)]
    return trace, origin


def chrome_trace(runs: dict, stage_names: list[str], title: str, calls: dict | None = None) -> dict:
    """Chrome trace-event JSON: complete ("X") events in microseconds, stages nested in steps nested in
    their generation; the engine's plan on thread 1, the baseline on thread 2. Prompt mode (`calls`: each
    generate(prompt=...) call's (start_ns, end_ns)): each call ("prompt to image", cat "image") holds its
    pipeline phases (tokenize, clip_l, clip_g, t5, vae_decode; cat "pipeline") and the sampling generation."""
    trace, origin = _trace_header(runs, title)
    if calls is not None:
        origin = min(origin, *(start for plan in calls.values() for start, _ in plan))
    for tid, (plan, results) in enumerate(runs.items(), start=1):
        for iteration, r in enumerate(results):
            if calls is not None:
                start, end = calls[plan][iteration]
                call = {"start_ns": start, "end_ns": end, "device_ns": None}
                trace.append(_trace_event("prompt to image", "image", call, tid, origin, {"iteration": iteration, "plan": plan}))
                for span in r.spans:
                    trace.append(_trace_event(span["stage"], "pipeline", dict(span, device_ns=None), tid, origin, {}))
            for e in r.events:
                if e["kind"] == "generation":
                    name, args = "generate", {"iteration": iteration, "plan": plan, "effective_nfe": r.stats["effective_nfe"]}
                elif e["kind"] == "prepare":
                    name, args = "prepare", {}
                elif e["kind"] == "step":
                    name, args = f"step {e['step']} ({e['level']})", {"step": e["step"], "level": e["level"]}
                else:
                    name, args = e["stage"], {"step": e["step"], "block": e["block"]}
                trace.append(_trace_event(name, e["kind"], e, tid, origin, args))
    return {"traceEvents": trace, "displayTimeUnit": "ms", "otherData": {"generator": "profile-engine", "stages": stage_names}}


def lemur_trace(runs: dict, stage_names: list[str], title: str) -> dict:
    """Chrome trace-event JSON of LEMUR calls: each call ("embed call", "score call"; cat "call") holding its
    stage call (named by stage; cat "stage") and its bank work (cat "bank"); one thread per program."""
    trace, origin = _trace_header(runs, title)
    for tid, (program, results) in enumerate(runs.items(), start=1):
        for iteration, r in enumerate(results):
            for e in r.events:
                if e["kind"] == "generation":
                    trace.append(_trace_event(f"{program} call", "call", e, tid, origin, {"iteration": iteration, "batch": r.stats["batch"]}))
                elif e["kind"] == "stage":
                    trace.append(_trace_event(e["stage"], "stage", e, tid, origin, {}))
                elif e["kind"] == "bank":
                    trace.append(_trace_event(BANK_WORK[program], "bank", e, tid, origin, {}))
    return {"traceEvents": trace, "displayTimeUnit": "ms", "otherData": {"generator": "profile-engine", "family": "lemur",
                                                                          "stages": stage_names}}


STAT_COLUMNS = ("min", "mean", "median", "p90", "p95", "p99", "max")


def _stages_outside_blocks(report: dict) -> list:
    """The tables list the stages that compute no block (embed, compensate, final) by stage, and the
    stages of a block (block_i, block_i_*) together as that block."""
    return [(name, st) for name, st in report["stages"].items() if st["block"] < 0]


TABLE_HEADER = f"{'':24} {'count':>6} " + " ".join(f"{c:>8}" for c in STAT_COLUMNS) + f" {'share':>6} {'per s':>8}"


def _table_row(label: str, st: dict, share: float | None = None) -> str:
    cells = " ".join(f"{st[c]:8.3f}" for c in STAT_COLUMNS)
    share_text = f"{100 * share:5.1f}%" if share is not None else ""
    return f"{label:24} {st['count']:6d} {cells} {share_text:>6} {st['throughput_per_s']:8.1f}"


def _per_s_label(program: str) -> str:
    return ITEMS_PER_S[program].replace("_per_s", "/s")  # documents/s, scores/s


def _family(report: dict) -> str:
    return report.get("family", "sd3")  # reports written before LEMUR profiling have no "family": SD3


def _quantization_line(q) -> str:
    """int8 bundles: what is int8 and what calibration kept float, stage by stage (the manifest's record, which the
    runtime does not read: a record of another shape is named, not trusted)."""
    try:
        stages = q["stages"]
        kept = [f"{name}: {', '.join(n['module'] or n['node'] for n in st['float_nodes'])}" for name, st in stages.items() if st["float_nodes"]]
        return (f"int8 ({q['method']}): {sum(st['int8_nodes'] for st in stages.values())} matmuls int8 in {len(stages)} stages; "
                f"kept float: {'; '.join(kept) if kept else 'no matmul'}; float stages: {', '.join(q['float_stages']) or 'none'}")
    except (KeyError, TypeError, AttributeError):
        return "int8: the manifest's quantization record is not in the expected form"


def report_table(report: dict) -> str:
    if _family(report) == "lemur":
        return lemur_table(report)
    e, s = report["engine"], report["settings"]
    h, w = s["latent_size"]
    lines = [f"{e['path']}: {e['family']} {e['precision']}, {e['num_layers']} blocks, {len(report['steps'])} steps; "
             f"batch {s['batch']}, latent {h}x{w}, text {s['text_len']}, X-Slim {s['xslim']}",
             f"{s['iters']} timed generations after {s['warmup']} warm-up; host time from the runtime's events (ms); "
             "device time: not measured (CPU)", "", TABLE_HEADER]
    row = _table_row
    if e.get("quantization"):
        lines.insert(1, _quantization_line(e["quantization"]))

    if report.get("prompt"):  # prompt to image and its phases (share: of prompt to image); the sampling call below
        p = report["prompt"]
        lines.insert(2, f"prompt {p['prompt']!r}, negative {p['negative_prompt']!r}, image {p['image_size'][0]}x{p['image_size'][1]} px; "
                        f"prompt cache {p['prompt_cache']}")
        lines.append(row("prompt to image", p["image"], 1.0))
        for name, st in p["phases"].items():
            lines.append(row(f"  {'steps (generation)' if name == 'steps' else name}", st, st["share"]))
        lines.append(row("  other host work", p["other_host"], p["other_host"]["share"]))
    lines.append(row("generation", report["generation"], 1.0))
    for st in report["steps"]:
        lines.append(row(f"step {st['index']} ({st['level']})", st, st["mean"] / report["generation"]["mean"]))
    for name, st in _stages_outside_blocks(report):
        lines.append(row(f"stage {name}", st, st["share"]))
    for st in report["blocks"]:
        lines.append(row(f"block {st['index']}", st, st["share"]))
    lines.append(row("prepare", report["prepare"], report["prepare"]["share"]))
    lines.append(row("other host work", report["other_host"], report["other_host"]["share"]))
    lines.append("")
    per_s = report["prompt"]["image"] if report.get("prompt") else report["generation"]
    lines.append(f"effective NFE {report['effective_nfe']:.2f}; {per_s['images_per_s']:.2f} images/s")
    if report["baseline"]:
        b = report["baseline"]
        lines.append(f"baseline ({b['plan']}, same weights, same run): mean {b['generation']['mean']:.3f} ms, "
                     f"median {b['generation']['median']:.3f} ms, effective NFE {b['effective_nfe']:.2f}")
        lines.append(f"speedup over the baseline: {report['speedup']['mean']:.2f}x (mean), {report['speedup']['median']:.2f}x (median)")
    return "\n".join(lines)


def lemur_table(report: dict) -> str:
    e, s = report["engine"], report["settings"]
    lines = [f"{e['path']}: lemur {e['precision']}, {e['embed_dim']}-d embeddings; batch {s['batch']}, history {s['history']}, "
             f"text {s['text_len']}, frames {s['frames']}, query {s['query_len']}",
             f"{s['iters']} timed calls of each program after {s['warmup']} warm-up, bank of {s['bank_documents']} documents; "
             "host time from the runtime's events (ms); device time: not measured (CPU)", "", TABLE_HEADER]
    if e.get("quantization"):
        lines.insert(1, _quantization_line(e["quantization"]))
    for program, p in report["programs"].items():
        lines.append(_table_row(f"{program} call", p["call"], 1.0))
        lines += [_table_row(f"  stage {name}", st, st["share"]) for name, st in p["stages"].items()]
        lines.append(_table_row(f"  {p['bank']['work']}", p["bank"], p["bank"]["share"]))
        lines.append(_table_row("  other host work", p["other_host"], p["other_host"]["share"]))
    lines.append("")
    lines.append("; ".join(f"{program}: {p['call'][ITEMS_PER_S[program]]:.1f} {_per_s_label(program)}"
                           for program, p in report["programs"].items()))
    lines.append(f"no baseline: {report['baseline_note']}")
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'slimengine[profile]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plot(report: dict, trace: dict, path: Path) -> None:
    if _family(report) == "lemur":
        return write_lemur_plot(report, trace, path)
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    dpi = 100
    fig, (ax_stages, ax_steps, ax_blocks) = plt.subplots(3, 1, figsize=(PLOT_SIZE_PX[0] / dpi, PLOT_SIZE_PX[1] / dpi), dpi=dpi,
                                                         gridspec_kw={"height_ratios": [1.2, 1, 1.2]})
    prompt = report.get("prompt")
    whole = prompt["image"] if prompt else report["generation"]  # what a bar's share is of
    fig.suptitle(f"profile-engine {report['engine']['path']}: mean {whole['mean']:.2f} ms per "
                 f"{'image from a prompt' if prompt else 'generation'}, effective NFE {report['effective_nfe']:.2f}")

    # Time per generation by stage, and the host work outside any stage call; prompt mode: the pipeline phases first.
    phases = {name: st for name, st in prompt["phases"].items() if name != "steps"} if prompt else {}
    names = [f"{name} (prompt path)" for name in phases] + list(report["stages"]) + ["(prepare)", "(other host work)"]
    values = [st["per_generation_ms"] for st in phases.values()] + [st["per_generation_ms"] for st in report["stages"].values()] \
        + [report["prepare"]["mean"], report["other_host"]["mean"]]
    ax_stages.barh(names, values, color=[PIPELINE_COLOURS[p] for p in phases] + ["tab:blue"] * len(report["stages"]) + ["tab:gray"] * 2)
    ax_stages.invert_yaxis()
    ax_stages.set_xlabel(f"ms per {'image' if prompt else 'generation'} (mean)")
    ax_stages.set_title("latency breakdown by stage")
    for y, v in enumerate(values):
        ax_stages.text(v, y, f" {v:.2f} ms ({100 * v / whole['mean']:.1f}%)", va="center", fontsize=8)

    # The median generation of the engine's plan as a timeline: steps coloured by step level, stage calls below;
    # prompt mode: the median prompt-to-image call, its pipeline phases in the steps' lane.
    generations = [e for e in trace["traceEvents"] if e.get("cat") == ("image" if prompt else "generation") and e["tid"] == 1]
    median = sorted(generations, key=lambda e: e["dur"])[len(generations) // 2]
    inside = [e for e in trace["traceEvents"] if e.get("ph") == "X" and e["tid"] == 1 and median["ts"] <= e["ts"] <= median["ts"] + median["dur"]]
    for e in inside:
        start, dur = (e["ts"] - median["ts"]) / 1e3, e["dur"] / 1e3
        if e["cat"] == "step":
            ax_steps.broken_barh([(start, dur)], (1.1, 0.8), color=LEVEL_COLOURS.get(e["args"]["level"], "tab:purple"), edgecolor="white")
            ax_steps.text(start + dur / 2, 1.5, str(e["args"]["step"]), ha="center", va="center", fontsize=7)
        elif e["cat"] == "prepare":
            ax_steps.broken_barh([(start, dur)], (1.1, 0.8), color="tab:gray", edgecolor="white")
        elif e["cat"] == "pipeline":
            ax_steps.broken_barh([(start, dur)], (1.1, 0.8), color=PIPELINE_COLOURS[e["name"]], edgecolor="white")
        elif e["cat"] == "stage":
            colour = "tab:blue" if e["args"]["block"] >= 0 else "tab:cyan"
            ax_steps.broken_barh([(start, dur)], (0.1, 0.8), color=colour, edgecolor="white", linewidth=0.3)
    ax_steps.set_yticks([0.5, 1.5], ["stage calls", "steps"])
    ax_steps.set_xlabel(f"ms since the start of the {'prompt-to-image call' if prompt else 'generation'} (median run)")
    ax_steps.set_title("per-step timeline (colour: step level)")
    legend = {"prepare": "tab:gray", **{f"step: {level}": c for level, c in LEVEL_COLOURS.items()}, "stage: a block": "tab:blue",
              "stage: other": "tab:cyan"}
    if prompt:
        legend = {"prepare, tokenize": legend.pop("prepare"), **legend, "encoders": "tab:pink", "vae_decode": "tab:brown"}
    ax_steps.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in legend.values()], labels=list(legend), loc="upper right",
                    fontsize=8, ncols=-(-len(legend) // 2) if prompt else len(legend))
    ax_steps.set_ylim(0, 2.8 if prompt else 2.4)

    # Mean ms of each (step, block); blank where the block did not run.
    heat = np.array([[np.nan if v is None else v for v in row] for row in report["block_heatmap_ms"]], dtype=np.float64).reshape(
        len(report["steps"]), report["engine"]["num_layers"])
    image = ax_blocks.imshow(heat.T, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax_blocks, label="ms (mean)")
    ax_blocks.set_xlabel("step")
    ax_blocks.set_ylabel("block")
    ax_blocks.set_title("per-block time by step (blank: not run)")
    for axis in (ax_blocks.xaxis, ax_blocks.yaxis):
        axis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


LEMUR_PLOT_SIZE_PX = (1200, 800)
LEMUR_COLOURS = {"stage": "tab:blue", "bank": "tab:orange", "other": "tab:gray", "call": "tab:purple"}


def write_lemur_plot(report: dict, trace: dict, path: Path) -> None:
    """Two panels: each program's mean call split into stage, bank work and other host work; the median call
    of each program as a timeline (the call above its stage and bank events)."""
    plt = _pyplot()
    dpi = 100
    fig, (ax_parts, ax_time) = plt.subplots(2, 1, figsize=(LEMUR_PLOT_SIZE_PX[0] / dpi, LEMUR_PLOT_SIZE_PX[1] / dpi), dpi=dpi)
    programs = report["programs"]
    fig.suptitle(f"profile-engine {report['engine']['path']}: batch {report['settings']['batch']}, history {report['settings']['history']}; "
                 + ", ".join(f"{name} {p['call']['mean']:.3f} ms per call" for name, p in programs.items()))

    names, values, colours, shares = [], [], [], []
    for name, p in programs.items():
        parts = [(f"stage {stage}", "stage", st["per_call_ms"]) for stage, st in p["stages"].items()]
        parts += [(p["bank"]["work"], "bank", p["bank"]["per_call_ms"]), ("other host work", "other", p["other_host"]["mean"])]
        for label, kind, ms in parts:
            names.append(f"{name}: {label}")
            values.append(ms)
            colours.append(LEMUR_COLOURS[kind])
            shares.append(ms / p["call"]["mean"])
    ax_parts.barh(names, values, color=colours)
    ax_parts.invert_yaxis()
    ax_parts.set_xlabel("ms per call (mean)")
    ax_parts.set_title("latency breakdown per call: stage, bank work, other host work")
    for y, (v, share) in enumerate(zip(values, shares)):
        ax_parts.text(v, y, f" {v:.3f} ms ({100 * share:.1f}% of the call)", va="center", fontsize=8)
    ax_parts.set_xlim(0, max(values) * 1.3)

    ticks = []
    for row, (tid, name) in enumerate(enumerate(programs, start=1)):
        events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and e["tid"] == tid]
        calls = sorted((e for e in events if e["cat"] == "call"), key=lambda e: e["dur"])
        median = calls[len(calls) // 2]
        y = 2 * row
        for e in events:
            if median["ts"] <= e["ts"] <= median["ts"] + median["dur"]:
                lane = y + 0.1 if e["cat"] == "call" else y + 1.1  # the call above its events (the axis is inverted)
                ax_time.broken_barh([((e["ts"] - median["ts"]) / 1e3, e["dur"] / 1e3)], (lane, 0.8), color=LEMUR_COLOURS[e["cat"]],
                                    edgecolor="white")
        ticks += [(y + 0.5, f"{name}: call"), (y + 1.5, f"{name}: stage, bank")]
    ax_time.set_yticks([t for t, _ in ticks], [label for _, label in ticks])
    ax_time.set_xlabel("ms since the start of the call (median call of each program)")
    ax_time.set_title("per-call timeline")
    legend = {kind: LEMUR_COLOURS[kind] for kind in ("call", "stage", "bank")}
    ax_time.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in legend.values()], labels=list(legend), loc="upper right",
                   fontsize=8, ncols=len(legend))
    ax_time.set_ylim(2 * len(programs) + 0.1, -0.9)  # inverted, with room for the legend above the first call
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


# ---- --compare ----


def load_report(path: Path) -> dict:
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"no such report: {path}") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is not a JSON report: {e}") from None
    if not isinstance(report, dict) or report.get("schema") != SCHEMA:
        raise UsageError(f"{path} is not a profile-engine report (no \"schema\": \"{SCHEMA}\")")
    if report.get("schema_version") != SCHEMA_VERSION:
        raise UsageError(f"{path}: report schema version {report.get('schema_version')}, this profile-engine reads {SCHEMA_VERSION}")
    return report


def comparison_rows(report: dict) -> dict:
    """Label -> value (mean ms, or a figure) for every row --compare can match."""
    if _family(report) == "lemur":
        rows = {}
        for name, p in report["programs"].items():
            rows.update({f"{name} call mean ms": p["call"]["mean"], f"{name} call median ms": p["call"]["median"],
                         f"{name} call p99 ms": p["call"]["p99"]})
            rows.update({f"{name} stage {stage} ms/call": st["per_call_ms"] for stage, st in p["stages"].items()})
            rows[f"{name} bank ms/call"] = p["bank"]["per_call_ms"]
            rows[f"{name} other host ms/call"] = p["other_host"]["mean"]
            rows[f"{name} {_per_s_label(name)}"] = p["call"][ITEMS_PER_S[name]]
        return rows
    rows = {"generation mean ms": report["generation"]["mean"], "generation median ms": report["generation"]["median"],
            "effective NFE": report["effective_nfe"]}
    if report["speedup"]:
        rows["speedup vs baseline (mean)"] = report["speedup"]["mean"]
    rows.update({f"step {s['index']} mean ms": s["mean"] for s in report["steps"]})
    rows.update({f"stage {name} ms/generation": st["per_generation_ms"] for name, st in _stages_outside_blocks(report)})
    rows.update({f"block {b['index']} ms/generation": b["per_generation_ms"] for b in report["blocks"]})
    if report.get("prompt"):
        rows["prompt to image mean ms"] = report["prompt"]["image"]["mean"]
        rows.update({f"phase {name} ms/image": st["per_generation_ms"] for name, st in report["prompt"]["phases"].items()})
    rows["prepare ms"] = report["prepare"]["mean"]
    rows["other host work ms/generation"] = report["other_host"]["mean"]
    return rows


def _settings_text(report: dict) -> str:
    s = report["settings"]
    return f"batch {s['batch']}, history {s['history']}" if _family(report) == "lemur" else f"X-Slim {s['xslim']}"


def compare_table(a: dict, b: dict, path_a: Path, path_b: Path) -> str:
    if _family(a) != _family(b):
        raise UsageError(f"cannot compare a {_family(a)} report ({path_a}) with a {_family(b)} report ({path_b})")
    rows_a, rows_b = comparison_rows(a), comparison_rows(b)
    lines = [f"A: {path_a} ({a['engine']['path']}, {_settings_text(a)})",
             f"B: {path_b} ({b['engine']['path']}, {_settings_text(b)})", "",
             f"{'':34} {'A':>10} {'B':>10} {'B/A':>8}"]
    for label in list(rows_a) + [k for k in rows_b if k not in rows_a]:
        va, vb = rows_a.get(label), rows_b.get(label)
        ratio = f"{vb / va:8.3f}" if va and vb is not None else f"{'-':>8}"
        cell = lambda v: f"{v:10.3f}" if v is not None else f"{'-':>10}"  # noqa: E731
        lines.append(f"{label:34} {cell(va)} {cell(vb)} {ratio}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
