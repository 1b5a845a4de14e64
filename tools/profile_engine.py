"""profile-engine: where the milliseconds of an engine go, by stage, step and block.

    profile-engine NAME.engine [--warmup N] [--iters N] [--batch B] [--resolution R] [--cache POLICY]
                               [--json F] [--trace F] [--plot F]
    profile-engine --compare A.json B.json

Every time comes from the runtime's own event records (Session.profiling, slim_session_event): one
per stage call, step and generation, read with the host's steady clock around each backend call.
The baseline plan of the same weights (28 steps x 2 CFG, every block every step) is timed in the same
run, iterations interleaved with the engine's own, through the runtime's plan override
(slim_generate_params.num_steps). The JSON schema is documented in docs/profile-engine.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np

import slimengine as se

SCHEMA = "slimengine-profile"
SCHEMA_VERSION = 1
BASELINE_STEPS, BASELINE_SHIFT, BASELINE_GUIDANCE = 28, 3.0, 7.0  # plain SD3 (export/sampling_plan.py make_plan)
DEFAULT_TEXT_LEN = 333  # SD3: 77 CLIP + 256 T5 tokens
PERCENTILES = (90, 95, 99)
PLOT_SIZE_PX = (1200, 1400)  # width, height of the --plot PNG
LEVEL_COLOURS = {"full": "tab:red", "cached_range": "tab:orange", "reused": "tab:green", "block_refresh": "tab:cyan",
                 "token_refresh": "tab:olive"}


class UsageError(Exception):
    """A bad argument or input file: one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="profile-engine",
        description="Profile an engine bundle in the slimengine runtime: latency statistics per generation, step, stage and "
        "block from the runtime's own event records, the speedup over the 28-step CFG baseline of the same weights, "
        "a Chrome trace and plots.",
    )
    parser.add_argument("engine", nargs="?", type=Path, help="engine bundle directory (NAME.engine)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed generations first (default 2)")
    parser.add_argument("--iters", type=int, default=10, help="timed generations (default 10)")
    parser.add_argument("--batch", type=int, default=1, help="prompts per generation (default 1)")
    parser.add_argument("--resolution", help="latent size R or HxW, as slim_generate takes it (SD3's VAE: 128 for 1024 px); "
                        "default: the bundle's default_latent_size")
    parser.add_argument("--text-len", type=int, default=DEFAULT_TEXT_LEN, help=f"text tokens (default {DEFAULT_TEXT_LEN}, SD3's)")
    parser.add_argument("--cache", help="X-Slim policy (docs/xslim.md): none, xslim:step=T[,critical=C,refresh=block|token,...] "
                        "or xslim:schedule=FILE.json (default: the bundle's own policy)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the 28-step CFG baseline (no speedup figure)")
    parser.add_argument("--json", type=Path, help="write the report as JSON (schema: docs/profile-engine.md)")
    parser.add_argument("--trace", type=Path, help="write a Chrome-trace JSON (open it in ui.perfetto.dev or chrome://tracing)")
    parser.add_argument("--plot", type=Path, help="write a PNG: time per stage, per-step timeline by cache level, per-block heatmap")
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
        if family == "sd3":
            report, trace = profile_sd3(args)
        elif family == "lemur":
            raise UsageError(f"{args.engine} is a lemur engine; profiling lemur (embed, score) is not supported by this build")
        else:
            raise UsageError(f"{args.engine}: model family {family!r} is not supported (expected sd3)")
        print(report_table(report))
        if args.json:
            args.json.write_text(json.dumps(report, indent=1) + "\n")
        if args.trace:
            args.trace.write_text(json.dumps(trace) + "\n")
        if args.plot:
            write_plot(report, trace, args.plot)
    except UsageError as e:
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
    for name in ("iters", "batch", "text_len"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise UsageError(f"--warmup must be 0 or more, got {args.warmup}")
    if args.plot and args.plot.suffix.lower() != ".png":
        raise UsageError(f"--plot writes a PNG: give a .png file name, got {args.plot}")


def read_manifest(path: Path) -> dict:
    """The bundle's manifest.json, read only to pick the model family's profiler (the runtime validates it)."""
    if not path.exists():
        raise UsageError(f"no such engine: {path}")
    try:
        manifest = json.loads((path / "manifest.json").read_text())
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


def cache_request(spec: str | None, program: dict) -> dict:
    """Session.generate arguments for a --cache policy (None: the bundle's own). The one place a policy
    becomes runtime parameters; the policy syntax is export/xslim.py's (docs/xslim.md)."""
    if spec is None:
        return {}
    from slimengine.export.xslim import parse_cache_spec

    try:
        parse_cache_spec(spec, steps=len(program["steps"]))
    except ValueError as e:
        raise UsageError(f"--cache {spec}: {e}") from None
    return {"cache": spec}


# ---- measuring ----


def profile_sd3(args) -> tuple[dict, dict]:
    """Time the bundle's program (and the baseline plan) and summarise; returns (report, trace)."""
    try:
        engine = se.open_engine(args.engine)  # validates the manifest
    except se.SlimError as e:
        raise UsageError(f"{args.engine}: {e}") from None
    config, program = engine.config, engine.manifest["program"]
    height, width = latent_size(args.resolution, config)
    cache = cache_request(args.cache, program)
    rng = np.random.default_rng(0)
    text, neg_text = rng.standard_normal((2, args.batch, args.text_len, config["joint_attention_dim"]), dtype=np.float32)
    pooled, neg_pooled = rng.standard_normal((2, args.batch, config["pooled_projection_dim"]), dtype=np.float32)
    inputs = dict(negative_prompt_embeds=neg_text, negative_pooled_embeds=neg_pooled, seed=0, height=height, width=width)
    guidance = program["guidance_scale"]
    baseline_guidance = guidance if guidance > 1 else BASELINE_GUIDANCE
    plans = {"engine": dict(inputs, **cache)}
    if not args.no_baseline:
        plans["baseline"] = dict(inputs, num_steps=BASELINE_STEPS, shift=BASELINE_SHIFT, guidance_scale=baseline_guidance,
                                 cache="none")
    sessions = {name: engine.session() for name in plans}
    for session in sessions.values():
        session.profiling = True
    runs = {name: [] for name in plans}
    from tqdm import tqdm

    with tqdm(total=(args.warmup + args.iters) * len(plans), desc="profile", unit="gen", disable=args.quiet, file=sys.stderr) as bar:
        for i in range(args.warmup + args.iters):
            for name, kwargs in plans.items():  # interleaved, so drift on a shared machine hits both alike
                result = sessions[name].generate(text, pooled, **kwargs)
                if i >= args.warmup:
                    runs[name].append(result)
                bar.update()
    stage_names = engine.stage_names
    report = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "engine": {"path": str(args.engine), "family": engine.manifest["family"], "precision": engine.manifest["precision"],
                   "num_layers": config["num_layers"], "stages": stage_names, "runtime_version": se.version()},
        "settings": {"warmup": args.warmup, "iters": args.iters, "batch": args.batch, "latent_size": [height, width],
                     "text_len": args.text_len, "cache": args.cache or "bundle", "guidance_scale": guidance, "seed": 0,
                     "device": "cpu", "device_time": False},
        **summarize(runs["engine"], config["num_layers"], args.batch),
        "baseline": None,
        "speedup": None,
    }
    if "baseline" in runs:
        base = summarize(runs["baseline"], config["num_layers"], args.batch)
        report["baseline"] = {"plan": f"{BASELINE_STEPS} steps x 2 CFG, every block every step", "steps": BASELINE_STEPS,
                              "shift": BASELINE_SHIFT, "guidance_scale": baseline_guidance, "effective_nfe": base["effective_nfe"],
                              "generation": base["generation"]}
        report["speedup"] = {stat: base["generation"][stat] / report["generation"][stat] for stat in ("mean", "median")}
    return report, chrome_trace(runs, stage_names, args.engine.name)


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

    def calls(events: list[dict]) -> dict:  # per-call statistics, and the share of a generation they take
        per_generation = sum(_ms(e) for e in events) / iters
        return {"calls_per_generation": len(events) / iters, "per_generation_ms": per_generation, "share": per_generation / gen_mean,
                **latency_stats([_ms(e) for e in events]), "device": device_stats(events)}

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
        "stages": {name: {"block": events[0]["block"], **calls(events)} for name, events in by_stage.items()},
        "blocks": [{"index": b, **calls(by_block[b])} for b in sorted(by_block)],
        "block_heatmap_ms": heatmap,
        "prepare": dict(latency_stats([_ms(p) for p in prepares]), share=float(np.mean([_ms(p) for p in prepares])) / gen_mean,
                        device=device_stats(prepares)),
        "other_host": dict(latency_stats(other), share=float(np.mean(other)) / gen_mean),
    }


# ---- outputs ----


def chrome_trace(runs: dict, stage_names: list[str], title: str) -> dict:
    """Chrome trace-event JSON: complete ("X") events in microseconds, stages nested in steps nested in
    their generation; the engine's plan on thread 1, the baseline on thread 2."""
    all_events = [e for results in runs.values() for r in results for e in r.events]
    origin = min(e["start_ns"] for e in all_events)
    trace = [{"ph": "M", "pid": 1, "tid": 0, "name": "process_name", "args": {"name": f"profile-engine {title}"}}]
    for tid, (plan, results) in enumerate(runs.items(), start=1):
        trace.append({"ph": "M", "pid": 1, "tid": tid, "name": "thread_name", "args": {"name": plan}})
        for iteration, r in enumerate(results):
            for e in r.events:
                if e["kind"] == "generation":
                    name, args = "generate", {"iteration": iteration, "plan": plan, "effective_nfe": r.stats["effective_nfe"]}
                elif e["kind"] == "prepare":
                    name, args = "prepare", {}
                elif e["kind"] == "step":
                    name, args = f"step {e['step']} ({e['level']})", {"step": e["step"], "level": e["level"]}
                else:
                    name, args = e["stage"], {"step": e["step"], "block": e["block"]}
                if e["device_ns"] is not None:
                    args["device_us"] = e["device_ns"] / 1e3
                trace.append({"name": name, "cat": e["kind"], "ph": "X", "pid": 1, "tid": tid, "ts": (e["start_ns"] - origin) / 1e3,
                              "dur": (e["end_ns"] - e["start_ns"]) / 1e3, "args": args})
    return {"traceEvents": trace, "displayTimeUnit": "ms", "otherData": {"generator": "profile-engine", "stages": stage_names}}


STAT_COLUMNS = ("min", "mean", "median", "p90", "p95", "p99", "max")


def _stages_outside_blocks(report: dict) -> list:
    """The tables list the stages that compute no block (embed, compensate, final) by stage, and the
    stages of a block (block_i, block_i_*) together as that block."""
    return [(name, st) for name, st in report["stages"].items() if st["block"] < 0]


def report_table(report: dict) -> str:
    e, s = report["engine"], report["settings"]
    h, w = s["latent_size"]
    lines = [f"{e['path']}: {e['family']} {e['precision']}, {e['num_layers']} blocks, {len(report['steps'])} steps; "
             f"batch {s['batch']}, latent {h}x{w}, text {s['text_len']}, cache {s['cache']}",
             f"{s['iters']} timed generations after {s['warmup']} warm-up; host time from the runtime's events (ms); "
             "device time: not measured (CPU)", ""]
    header = f"{'':24} {'count':>6} " + " ".join(f"{c:>8}" for c in STAT_COLUMNS) + f" {'share':>6} {'per s':>8}"
    lines.append(header)

    def row(label, st, share=None):
        cells = " ".join(f"{st[c]:8.3f}" for c in STAT_COLUMNS)
        share_text = f"{100 * share:5.1f}%" if share is not None else ""
        return f"{label:24} {st['count']:6d} {cells} {share_text:>6} {st['throughput_per_s']:8.1f}"

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
    lines.append(f"effective NFE {report['effective_nfe']:.2f}; {report['generation']['images_per_s']:.2f} images/s")
    if report["baseline"]:
        b = report["baseline"]
        lines.append(f"baseline ({b['plan']}, same weights, same run): mean {b['generation']['mean']:.3f} ms, "
                     f"median {b['generation']['median']:.3f} ms, effective NFE {b['effective_nfe']:.2f}")
        lines.append(f"speedup over the baseline: {report['speedup']['mean']:.2f}x (mean), {report['speedup']['median']:.2f}x (median)")
    return "\n".join(lines)


def write_plot(report: dict, trace: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'slimengine[profile]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    dpi = 100
    fig, (ax_stages, ax_steps, ax_blocks) = plt.subplots(3, 1, figsize=(PLOT_SIZE_PX[0] / dpi, PLOT_SIZE_PX[1] / dpi), dpi=dpi,
                                                         gridspec_kw={"height_ratios": [1.2, 1, 1.2]})
    fig.suptitle(f"profile-engine {report['engine']['path']}: mean {report['generation']['mean']:.2f} ms per generation, "
                 f"effective NFE {report['effective_nfe']:.2f}")

    # Time per generation by stage, and the host work outside any stage call.
    names = list(report["stages"]) + ["(prepare)", "(other host work)"]
    values = [st["per_generation_ms"] for st in report["stages"].values()] + [report["prepare"]["mean"], report["other_host"]["mean"]]
    ax_stages.barh(names, values, color=["tab:blue"] * (len(names) - 2) + ["tab:gray"] * 2)
    ax_stages.invert_yaxis()
    ax_stages.set_xlabel("ms per generation (mean)")
    ax_stages.set_title("latency breakdown by stage")
    for y, v in enumerate(values):
        ax_stages.text(v, y, f" {v:.2f} ms ({100 * v / report['generation']['mean']:.1f}%)", va="center", fontsize=8)

    # The median generation of the engine's plan as a timeline: steps coloured by cache level, stage calls below.
    generations = [e for e in trace["traceEvents"] if e.get("cat") == "generation" and e["tid"] == 1]
    median = sorted(generations, key=lambda e: e["dur"])[len(generations) // 2]
    inside = [e for e in trace["traceEvents"] if e.get("ph") == "X" and e["tid"] == 1 and median["ts"] <= e["ts"] <= median["ts"] + median["dur"]]
    for e in inside:
        start, dur = (e["ts"] - median["ts"]) / 1e3, e["dur"] / 1e3
        if e["cat"] == "step":
            ax_steps.broken_barh([(start, dur)], (1.1, 0.8), color=LEVEL_COLOURS.get(e["args"]["level"], "tab:purple"), edgecolor="white")
            ax_steps.text(start + dur / 2, 1.5, str(e["args"]["step"]), ha="center", va="center", fontsize=7)
        elif e["cat"] == "prepare":
            ax_steps.broken_barh([(start, dur)], (1.1, 0.8), color="tab:gray", edgecolor="white")
        elif e["cat"] == "stage":
            colour = "tab:blue" if e["args"]["block"] >= 0 else "tab:cyan"
            ax_steps.broken_barh([(start, dur)], (0.1, 0.8), color=colour, edgecolor="white", linewidth=0.3)
    ax_steps.set_yticks([0.5, 1.5], ["stage calls", "steps"])
    ax_steps.set_xlabel("ms since the start of the generation (median run)")
    ax_steps.set_title("per-step timeline (colour: cache level)")
    legend = {"prepare": "tab:gray", **{f"step: {level}": c for level, c in LEVEL_COLOURS.items()}, "stage: a block": "tab:blue",
              "stage: other": "tab:cyan"}
    ax_steps.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in legend.values()], labels=list(legend), loc="upper right",
                    fontsize=8, ncols=len(legend))
    ax_steps.set_ylim(0, 2.4)

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
    rows = {"generation mean ms": report["generation"]["mean"], "generation median ms": report["generation"]["median"],
            "effective NFE": report["effective_nfe"]}
    if report["speedup"]:
        rows["speedup vs baseline (mean)"] = report["speedup"]["mean"]
    rows.update({f"step {s['index']} mean ms": s["mean"] for s in report["steps"]})
    rows.update({f"stage {name} ms/generation": st["per_generation_ms"] for name, st in _stages_outside_blocks(report)})
    rows.update({f"block {b['index']} ms/generation": b["per_generation_ms"] for b in report["blocks"]})
    rows["prepare ms"] = report["prepare"]["mean"]
    rows["other host work ms/generation"] = report["other_host"]["mean"]
    return rows


def compare_table(a: dict, b: dict, path_a: Path, path_b: Path) -> str:
    rows_a, rows_b = comparison_rows(a), comparison_rows(b)
    lines = [f"A: {path_a} ({a['engine']['path']}, cache {a['settings']['cache']})",
             f"B: {path_b} ({b['engine']['path']}, cache {b['settings']['cache']})", "",
             f"{'':34} {'A':>10} {'B':>10} {'B/A':>8}"]
    for label in list(rows_a) + [k for k in rows_b if k not in rows_a]:
        va, vb = rows_a.get(label), rows_b.get(label)
        ratio = f"{vb / va:8.3f}" if va and vb is not None else f"{'-':>8}"
        cell = lambda v: f"{v:10.3f}" if v is not None else f"{'-':>10}"  # noqa: E731
        lines.append(f"{label:34} {cell(va)} {cell(vb)} {ratio}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
