"""slimengine: the runtime's command line.

`slimengine verify BUNDLE` checks an engine bundle's integrity. Exit status: 0 intact, 1 the bundle fails the check
(the message names the file or field), 2 usage.
`slimengine triton-repo ENGINE... -o DIR` writes a Triton model repository; `slimengine serve ENGINE...` runs one on the
tritonserver of nvidia-pytriton (docs/serving.md). Exit status 0, 1 on failure, 2 usage (an -o that is not a new path or,
with --force, a repository directory, too).
`slimengine generate ENGINE "a prompt" -o out.png` goes from a prompt to a PNG on a bundle with pipeline stages
(docs/pipeline.md). Exit status 0, 1 on failure (a bundle without pipeline stages too), 2 usage.
`slimengine bank repair PATH` rewrites a damaged LEMUR memory bank with every id it can prove live
(docs/memory-bank.md, Repair). Exit status 0, 1 on failure, 2 usage.
Outputs are written only where a command may write (staging.output_file; docs/export.md, "Output files").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimengine", description="The slimengine runtime's command line.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    verify = commands.add_parser(
        "verify", help="check an engine bundle's integrity",
        description="Check an engine bundle without loading it: the manifest against its digest (manifest.sha256), every file "
                    "listed, a regular file of its listed size, and the sha256 of every file (--fast: of the stage graphs only, "
                    "as opening an engine does by default). Exit 0 when intact, 1 when not (naming the file), 2 on a usage error.")
    verify.add_argument("bundle", type=Path, metavar="BUNDLE", help="the engine bundle directory (NAME.engine)")
    verify.add_argument("--fast", action="store_true", help="skip hashing the weight files (the check open_engine makes by default)")
    verify.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no line on success")
    repo = commands.add_parser(
        "triton-repo", help="write a Triton Inference Server model repository for engine bundles",
        description="Write a standard Triton model repository: one Python-backend model per program (sd3; lemur_embed, and "
                    "lemur_score with --bank), each opening its bundle by path with the slimengine runtime. Give NAME=ENGINE to "
                    "name a model (NAME replaces 'sd3', or the 'lemur' prefix). See docs/serving.md.")
    repo.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="the repository to write (atomically)")
    repo.add_argument("--force", action="store_true", help="replace an existing DIR")
    _repository_options(repo)
    serve = commands.add_parser(
        "serve", help="serve engine bundles on a local Triton Inference Server (nvidia-pytriton's tritonserver)",
        description="Write a Triton model repository for the bundles into a temporary directory and run the tritonserver of "
                    "the nvidia-pytriton package on it until interrupted (Ctrl-C, SIGTERM), restarting it whenever it dies. KServe v2 HTTP on --port, gRPC on "
                    "--grpc-port, Prometheus metrics on --metrics-port. See docs/serving.md.")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    serve.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001)")
    serve.add_argument("--metrics-port", type=int, default=8002, help="metrics port (default 8002)")
    _repository_options(serve)
    gen = commands.add_parser(
        "generate", help="prompt to image (PNG) on a bundle with pipeline stages",
        description="Tokenize, encode (CLIP-L, CLIP-G, T5), sample and decode with the bundle's stages, and write the image as a "
                    "PNG (needs Pillow). The bundle must have been exported from an SD3 pipeline folder (export-engine "
                    "PIPELINE_FOLDER, or a transformer checkpoint with --pipeline PIPELINE_FOLDER). See docs/pipeline.md.")
    gen.add_argument("engine", type=Path, metavar="ENGINE", help="the engine bundle directory (NAME.engine)")
    gen.add_argument("prompt", help="the prompt")
    gen.add_argument("-o", "--output", required=True, metavar="PNG", help="the image to write")  # str: keeps a trailing "/"
    gen.add_argument("--negative", default="", help='the negative prompt for CFG (default "")')
    gen.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    gen.add_argument("--size", metavar="H[xW]", help="image size in pixels, a multiple of the VAE's factor (default: the bundle's)")
    gen.add_argument("--guidance", type=float, help="CFG scale (default: the bundle's; <= 1: no CFG)")
    gen.add_argument("--steps", type=int, help="a plain plan of that many steps with the pipeline's scheduler shift (default: "
                                               "the bundle's program)")
    gen.add_argument("--xslim", help='X-Slim policy override: "none" or a spec such as "xslim:step=0.1" (default: the bundle\'s)')
    gen.add_argument("--device", default="cpu", help='"cpu" (default) or "cuda[:N]"')
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary line")
    bank = commands.add_parser("bank", help="LEMUR memory bank maintenance").add_subparsers(dest="bank_command", metavar="ACTION",
                                                                                          required=True)
    repair = bank.add_parser(
        "repair", help="rewrite a damaged memory bank with every id it can prove live",
        description="Rewrite the bank file with one record per live id (docs/memory-bank.md, Repair): records and a header "
                    "with one flipped bit corrected, a header damaged beyond that rebuilt from the records, no deleted id, and "
                    "none of the ids written before a record damaged beyond correction (it may have deleted any of them). No "
                    "writer may have the bank open; readers must open it again. Exit 0 when repaired, 1 on failure, 2 on a "
                    "usage error.")
    repair.add_argument("path", type=Path, metavar="PATH", help="the bank file")
    return parser


def _size(text: str | None) -> tuple[int | None, int | None]:
    from .runtime import INT32_MAX, _integer

    if text is None:
        return None, None
    height, sep, width = text.lower().partition("x")
    try:
        height, width = int(height), int(width if sep else height)  # "64x" is no size: int("") refuses it
    except ValueError:
        raise ValueError(f"--size must be H or HxW in pixels, got {text!r}") from None
    return _integer(height, "--size height", 1, INT32_MAX), _integer(width, "--size width", 1, INT32_MAX)


def generate(args: argparse.Namespace) -> int:
    import signal

    from .runtime import MAX_STEPS, UINT64_MAX, Engine, SlimError, _integer, _real
    from .staging import output_file, write_file_atomically

    if not args.engine.is_dir():
        print(f"slimengine generate: {args.engine} is not a directory (give an engine bundle, NAME.engine)", file=sys.stderr)
        return 2
    try:  # the runtime's limits and the output path, before the engine is opened (the bundle's own limits come after)
        height, width = _size(args.size)
        _integer(args.seed, "--seed", 0, UINT64_MAX)
        if args.steps is not None:
            _integer(args.steps, "--steps", 1, MAX_STEPS)
        if args.guidance is not None:
            _real(args.guidance, "--guidance", 0)
        output_file(args.output, inputs=[args.engine])  # never into the bundle it reads
    except ValueError as e:
        print(f"slimengine generate: {e}", file=sys.stderr)
        return 2
    bar = None
    if not args.quiet:
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None:  # one tick per sampling step (the runtime reports each); its total is known at the first
            bar = tqdm(total=None, unit="step", leave=False, file=sys.stderr, disable=None)

    # Ctrl-C while the runtime samples: a KeyboardInterrupt raised at a ctypes callback's entry, before its `try`,
    # is printed ("Exception ignored") and lost. So in that call the handler only marks it, and progress() raises it
    # inside the callback's try (the call is cancelled and re-raises it); elsewhere it is raised at once.
    interrupted, in_runtime = False, False

    def on_sigint(_signum, _frame):
        nonlocal interrupted
        interrupted = True
        if not in_runtime:
            raise KeyboardInterrupt

    def progress(phase: str, step: int, total: int) -> None:
        if interrupted:
            raise KeyboardInterrupt
        if bar is None:
            return
        if phase == "step":
            bar.total = total
            bar.update(step + 1 - bar.n)
        bar.set_description("sampling" if phase == "step" else phase)

    # Only over Python's own Ctrl-C handler: an ignored SIGINT (a background job) stays ignored
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.default_int_handler:
        signal.signal(signal.SIGINT, on_sigint)
    try:
        with Engine(args.engine, device=args.device) as engine:
            session = engine.session()
            in_runtime = True
            try:
                result = session.generate(prompt=args.prompt, negative_prompt=args.negative, seed=args.seed, height=height,
                                          width=width, guidance_scale=args.guidance, num_steps=args.steps, xslim=args.xslim,
                                          progress=progress)
            finally:
                in_runtime = False
            if interrupted:  # after the last callback
                raise KeyboardInterrupt
        write_file_atomically(args.output, lambda tmp: result.pil().save(tmp, format="PNG"))
    except (ValueError, TypeError) as e:  # out of the bundle's range (--size, --xslim), or the output path changed: a usage error
        print(f"slimengine generate: {e}", file=sys.stderr)
        return 2
    except (SlimError, OSError, ImportError) as e:
        print(f"slimengine generate: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, previous)
        if bar is not None:
            bar.close()
    if not args.quiet:
        ms = result.stats["stage_ms"]
        print(f"{args.output}: {result.image.shape[1]}x{result.image.shape[0]}, " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items()))
    return 0


def _repository_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("engines", nargs="+", metavar="ENGINE", help="engine bundles (NAME.engine), or NAME=ENGINE")
    parser.add_argument("--bank", type=Path, help="the LEMUR memory bank lemur_score reads (read-only; its writer runs elsewhere)")
    parser.add_argument("--instances", type=int, default=1, help="model instances (sessions) per engine (default 1)")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads per instance (default 0: all cores)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="run the engines on the CPU or on Triton's GPUs")
    parser.add_argument("--bundle-root", type=Path, help="write bundle and bank paths as BUNDLE_ROOT/NAME (where a container "
                                                          "mounts them) instead of their paths here")


def _options(args: argparse.Namespace):
    from .serving import RepositoryOptions

    return RepositoryOptions(bank=args.bank, instances=args.instances, threads=args.threads, device=args.device,
                             bundle_root=args.bundle_root)


def triton_repo(args: argparse.Namespace) -> int:
    from .runtime import SlimError
    from .serving import write_repository
    from .staging import OutputPathError

    try:
        specs = write_repository(args.engines, args.output, _options(args), force=args.force,
                                 report=lambda line: print(f"slimengine triton-repo: {line}", file=sys.stderr))
    except OutputPathError as e:  # checked before any bundle is opened
        print(f"slimengine triton-repo: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError, SlimError) as e:
        print(f"slimengine triton-repo: {e}", file=sys.stderr)
        return 1
    for spec in specs:
        print(f"{args.output}/{spec.name}: {spec.kind} of {spec.engine}")
    return 0


# `slimengine serve`: consecutive failed starts of a restarted tritonserver (1, 2, 4, 8 s apart) before serve gives up
RESTART_ATTEMPTS = 5


def serve(args: argparse.Namespace) -> int:
    """Run tritonserver on the bundles' repository until SIGINT or SIGTERM, restarting it whenever it dies (a request
    that aborts Triton must not take the deployment down for good)."""
    import signal
    import tempfile
    import time

    from .runtime import SlimError
    from .serving import write_repository
    from .serving.server import ServerError, TritonServer, pytriton_dist

    try:
        pytriton_dist()
    except ServerError as e:
        print(f"slimengine serve: {e}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="slimengine-serve-") as tmp:
        try:
            specs = write_repository(args.engines, Path(tmp) / "repository", _options(args))
        except (OSError, ValueError, SlimError) as e:
            print(f"slimengine serve: {e}", file=sys.stderr)
            return 1
        server = TritonServer(Path(tmp) / "repository", host=args.host, http_port=args.port, grpc_port=args.grpc_port,
                              metrics_port=args.metrics_port, log_file=Path(tmp) / "tritonserver.log")
        stopping = False

        def interrupt(signum, _frame):
            if not stopping:  # once stopping, stop() runs to its end (bounded); a second signal must not cut it short
                raise KeyboardInterrupt

        # Installed explicitly, SIGINT too: Python leaves SIGINT ignored when it starts ignored (a background job,
        # nohup), and Ctrl-C would then never stop us. SIGTERM (kill, Kubernetes) stops like Ctrl-C.
        signal.signal(signal.SIGINT, interrupt)
        signal.signal(signal.SIGTERM, interrupt)
        names = ", ".join(s.name for s in specs)
        try:
            server.start()
            print(f"serving {names}: HTTP {server.http_url}, gRPC {server.grpc_url}, metrics {server.metrics_url} (log "
                  f"{server.log_file}); Ctrl-C stops", flush=True)
            while True:
                time.sleep(0.5)
                code = server.exit_status()
                if code is None:
                    continue
                # Died under us (a request that aborts Triton's HTTP frontend, the OOM killer): restart it on the same
                # ports; slimengine_server_restarts tells the metrics. A restart that dies before it is ready (killed
                # again, a client retrying the request that aborts it) is tried again after a backoff; only
                # RESTART_ATTEMPTS failed starts in a row end `serve`. A server seen ready starts the count afresh.
                what = f"status {code}" if code >= 0 else f"signal {-code} ({signal.strsignal(-code)})"
                print(f"slimengine serve: tritonserver exited with {what}; restarting it (restart {server.restarts + 1}; "
                      f"its log: {server.log_file})", file=sys.stderr, flush=True)
                for attempt in range(1, RESTART_ATTEMPTS + 1):
                    server.restarts += 1
                    server.stop()
                    try:
                        server.start()
                        break
                    except ServerError as e:
                        if attempt == RESTART_ATTEMPTS:
                            raise ServerError(f"tritonserver failed to start {attempt} times in a row; giving up: {e}") from None
                        delay = min(2 ** (attempt - 1), 30)  # a SIGINT/SIGTERM in this sleep stops serve at once
                        print(f"slimengine serve: restart {server.restarts} failed ({str(e).splitlines()[0].rstrip(':')}); trying again in "
                              f"{delay} s", file=sys.stderr, flush=True)
                        time.sleep(delay)
                print(f"slimengine serve: serving {names} again (restart {server.restarts})", file=sys.stderr, flush=True)
        except ServerError as e:
            print(f"slimengine serve: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            stopping = True
            print(f"slimengine serve: stopping (at most {server.exit_timeout + 10} s)", file=sys.stderr, flush=True)
            return 0 if server.stop() == 0 else 1
        finally:
            stopping = True
            server.stop()


def verify(args: argparse.Namespace) -> int:
    from .runtime import SlimError, verify_bundle

    if not args.bundle.is_dir():
        print(f"slimengine verify: {args.bundle} is not a directory (give an engine bundle, NAME.engine)", file=sys.stderr)
        return 2
    level = "fast" if args.fast else "full"
    bar = None
    if not args.quiet and level == "full":
        from tqdm import tqdm

        bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc="sha256", leave=False, file=sys.stderr, disable=None)

    def progress(file: str, done: int, total: int) -> None:
        bar.total = total
        bar.set_postfix_str(file, refresh=False)
        bar.update(done - bar.n)

    try:
        verify_bundle(args.bundle, verify=level, progress=progress if bar is not None else None)
    except SlimError as e:
        if bar is not None:
            bar.close()
        print(f"slimengine verify: {e}", file=sys.stderr)
        return 1
    if bar is not None:
        bar.close()
    if not args.quiet:
        print(f"{args.bundle}: ok ({level} check)")
    return 0


def bank_repair(args: argparse.Namespace) -> int:
    from .runtime import MemoryBank, SlimError

    try:
        is_file = args.path.is_file()
    except OSError as e:  # a name too long for the system, say
        print(f"slimengine bank repair: {args.path}: {e.strerror}", file=sys.stderr)
        return 2
    if not is_file:
        print(f"slimengine bank repair: {args.path} is not a file (give a memory bank file)", file=sys.stderr)
        return 2
    try:
        r = MemoryBank.repair(args.path)
    except SlimError as e:
        print(f"slimengine bank repair: {e}", file=sys.stderr)
        return 1
    header = ("intact", "one flipped bit corrected", "rebuilt from the records")[r.header]
    print(f"{args.path}: {r.ids} ids kept; header {header}; {r.corrected_records} record(s) corrected, {r.unreadable_records} "
          f"unreadable (with {r.dropped_records} intact record(s) of their write calls), {r.hidden_ids} id(s) hidden as possibly "
          f"deleted, {r.tail_bytes} torn tail bytes left out")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "bank":
            return {"repair": bank_repair}[args.bank_command](args)
        return {"verify": verify, "triton-repo": triton_repo, "serve": serve, "generate": generate}[args.command](args)
    except KeyboardInterrupt:
        print("slimengine: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
