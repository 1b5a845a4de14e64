"""Where the installed runtime pieces are, for C/C++ builds and scripts.

    python -m slimengine.paths example   # the slimengine-example program
    python -m slimengine.paths ort       # ONNX Runtime's C library (set SLIMENGINE_ORT_LIBRARY to it)
    python -m slimengine.paths lib       # libslimengine.so
    python -m slimengine.paths include   # the folder holding slimengine.h
"""

import sys

from . import _native


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    what = {"example": _native.example_program, "ort": _native.onnxruntime_library, "lib": _native.library_path,
            "include": lambda: _native.header_path().parent}
    if len(argv) != 1 or argv[0] not in what:
        print(__doc__, file=sys.stderr)
        return 2
    print(what[argv[0]]())
    return 0


if __name__ == "__main__":
    sys.exit(main())
