"""slimengine: the runtime's command line. `slimengine verify BUNDLE` checks an engine bundle's integrity.

Exit status: 0 intact, 1 the bundle fails the check (the message names the file or field), 2 usage.
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
    return parser


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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"verify": verify}[args.command](args)
    except KeyboardInterrupt:
        print("slimengine: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
