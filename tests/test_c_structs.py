"""The C ABI's structs: the ctypes mirrors in the Python binding against the compiled header, and struct_size
(an older caller's smaller struct works; a struct larger than the library's is refused, not truncated)."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import slimengine as se
from slimengine import _native

from .conftest import CApiCall

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "runtime" / "include" / "slimengine.h"
LAYOUT_C = ROOT / "runtime" / "tests" / "struct_layout.c"


def header_structs() -> dict[str, list[str]]:
    """Every `typedef struct NAME { ... } NAME;` of the header, with its field names in order."""
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    structs = {}
    for m in re.finditer(r"typedef struct (\w+) \{(.*?)\}\s*\w+;", text, flags=re.S):
        fields = []
        for decl in filter(None, (d.strip() for d in m.group(2).split(";"))):
            fields += [re.findall(r"(\w+)\s*$", part.strip())[0] for part in decl.split(",")]
        structs[m.group(1)] = fields
    return structs


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory) -> dict[str, tuple[int, int]]:
    """{"slim_x": (sizeof, 0), "slim_x.field": (offsetof, sizeof)} as the C compiler lays the header out."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler")
    exe = tmp_path_factory.mktemp("layout") / "struct_layout"
    subprocess.run([cc, "-std=c99", "-Wall", "-Werror", f"-I{HEADER.parent}", str(LAYOUT_C), "-o", str(exe)], check=True)
    layout = {}
    for line in subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines():
        name, a, b = line.split()
        layout[name] = (int(b), 0) if a == "size" else (int(a), int(b))
    return layout


def mirrors() -> dict[str, type]:
    return {cls._c_name_: cls for cls in vars(_native).values()
            if isinstance(cls, type) and issubclass(cls, ctypes.Structure) and hasattr(cls, "_c_name_")}


def layout_problems(c_layout: dict, structs: dict[str, list[str]], found: dict[str, type]) -> list[str]:
    problems = []
    for name, fields in structs.items():
        cls = found.get(name)
        if cls is None:
            problems.append(f"{name}: no ctypes mirror in _native.py (a Structure with _c_name_ = {name!r})")
            continue
        if ctypes.sizeof(cls) != c_layout[name][0]:
            problems.append(f"{name}: sizeof is {c_layout[name][0]} in C, ctypes.sizeof({cls.__name__}) is {ctypes.sizeof(cls)}")
        py_fields = [f[0] for f in cls._fields_]
        if py_fields != fields:
            problems.append(f"{name}: fields in C are {fields}, {cls.__name__}._fields_ has {py_fields}")
        for field in fields:
            if field not in py_fields:
                continue
            offset, size = c_layout[f"{name}.{field}"]
            got = getattr(cls, field)
            if (got.offset, got.size) != (offset, size):
                problems.append(f"{name}.{field}: offset {offset} size {size} in C, {cls.__name__}.{field} has offset "
                                f"{got.offset} size {got.size}")
    for name in found.keys() - structs.keys():
        problems.append(f"_native.py mirrors {name}, which slimengine.h does not declare")
    return problems


def test_the_layout_program_covers_every_struct_and_field_of_the_header(c_layout):
    structs = header_structs()
    assert len(structs) >= 15  # the parser found the header's structs
    missing = [n for n, fields in structs.items() for key in [n, *(f"{n}.{f}" for f in fields)] if key not in c_layout]
    assert not missing, f"runtime/tests/struct_layout.c does not print {missing}: add STRUCT/FIELD lines for them"


def test_ctypes_mirrors_match_the_compiled_header(c_layout):
    problems = layout_problems(c_layout, header_structs(), mirrors())
    assert not problems, "ctypes mirrors in runtime/python/slimengine/_native.py differ from slimengine.h:\n" + "\n".join(problems)


def test_a_wrong_mirror_is_caught(c_layout):
    """The check itself: a mirror with one field of the wrong width, or a field left out, is reported by name."""
    found = mirrors()
    wrong = [(n, ctypes.c_int64 if n == "batch" else t) for n, t in _native.LemurStats._fields_]
    found["slim_lemur_stats"] = type("LemurStats", (ctypes.Structure,), {"_fields_": wrong})
    found["slim_bank_params"] = type("BankParams", (ctypes.Structure,), {"_fields_": _native.BankParams._fields_[:-1]})
    problems = "\n".join(layout_problems(c_layout, header_structs(), found))
    assert "slim_lemur_stats.batch: offset 4 size 4 in C, LemurStats.batch has offset 8 size 8" in problems
    assert "slim_lemur_stats.history_found: offset 8 size 8 in C, LemurStats.history_found has offset 16" in problems
    assert "slim_bank_params: sizeof is 20 in C" in problems and "'sync_writes'" in problems
    del found["slim_event"]
    assert "slim_event: no ctypes mirror" in "\n".join(layout_problems(c_layout, header_structs(), found))


# ---- struct_size larger than the library's: refused with the struct, the given and the known size ----


def padded(cls) -> ctypes.Structure:
    """A caller's struct from a newer header: the library's fields and 16 more bytes, struct_size saying so."""
    big = type(cls.__name__ + "Newer", (ctypes.Structure,), {"_fields_": [*cls._fields_, ("newer", ctypes.c_uint8 * 16)]})
    value = big()
    value.struct_size = ctypes.sizeof(big)
    return value


def refused(code: int, cls) -> None:
    lib = _native.lib()
    given, known = ctypes.sizeof(cls) + 16, ctypes.sizeof(cls)
    assert lib.slim_status_name(code).decode() == "SLIM_ERR_INVALID_ARGUMENT", lib.slim_last_error()
    message = lib.slim_last_error().decode()
    assert f"{cls._c_name_}.struct_size is {given}, larger than {known}, sizeof({cls._c_name_}) in this library" in message
    assert "newer slimengine.h" in message


def as_struct(value, cls):
    return ctypes.cast(ctypes.pointer(value), ctypes.POINTER(cls))  # the result keeps `value` alive


def test_engine_and_bank_params_larger_than_the_library_are_refused(distilled_bundle, tmp_path):
    lib, handle = _native.lib(), ctypes.c_void_p()
    params = padded(_native.EngineParams)
    ctypes.memmove(ctypes.byref(params), ctypes.byref(lib.slim_engine_default_params()), ctypes.sizeof(_native.EngineParams))
    params.struct_size = ctypes.sizeof(params)
    refused(lib.slim_engine_open(str(distilled_bundle).encode(), as_struct(params, _native.EngineParams), ctypes.byref(handle)),
            _native.EngineParams)
    assert not handle.value
    bank_params = padded(_native.BankParams)
    bank_params.dim = 4
    refused(lib.slim_bank_open(str(tmp_path / "b.bank").encode(), as_struct(bank_params, _native.BankParams), ctypes.byref(handle)),
            _native.BankParams)
    assert not (tmp_path / "b.bank").exists()


def test_generate_structs_larger_than_the_library_are_refused(distilled_bundle):
    engine = se.open_engine(distilled_bundle)
    call, lib = CApiCall(engine), _native.lib()
    session = call.session._handle
    params = padded(_native.GenerateParams)
    ctypes.memmove(ctypes.byref(params), ctypes.byref(lib.slim_generate_default_params()), ctypes.sizeof(_native.GenerateParams))
    params.struct_size = ctypes.sizeof(params)
    params.prompt_embeds, params.pooled_embeds = call.tensor(call.text), call.tensor(call.pooled)
    out = call.tensor(call.out)
    refused(lib.slim_generate(session, as_struct(params, _native.GenerateParams), out, None), _native.GenerateParams)
    good = lib.slim_generate_default_params()
    good.prompt_embeds, good.pooled_embeds = params.prompt_embeds, params.pooled_embeds
    stats = padded(_native.GenerateStats)
    refused(lib.slim_generate(session, ctypes.byref(good), out, as_struct(stats, _native.GenerateStats)), _native.GenerateStats)
    # An ABI 0.1 caller's smaller params (up to step_cache_threshold) and stats (up to backend_ms) still work.
    good.struct_size = _native.GenerateParams.cache_policy.offset
    old_stats = _native.GenerateStats(struct_size=_native.GenerateStats.flop_fraction.offset, flop_fraction=-7.0)
    assert lib.slim_generate(session, ctypes.byref(good), out, ctypes.byref(old_stats)) == 0, lib.slim_last_error()
    assert old_stats.steps == len(engine.manifest["program"]["steps"]) and old_stats.flop_fraction == -7.0  # not written

    assert lib.slim_session_set_profiling(session, 1) == 0
    good.struct_size = ctypes.sizeof(_native.GenerateParams)
    assert lib.slim_generate(session, ctypes.byref(good), out, None) == 0, lib.slim_last_error()
    for fn, cls in [(lib.slim_session_step_stats, _native.StepStats), (lib.slim_session_stage_stats, _native.StageStats),
                    (lib.slim_session_event, _native.Event)]:
        refused(fn(session, 0, as_struct(padded(cls), cls)), cls)
        exact = cls(struct_size=ctypes.sizeof(cls))
        assert fn(session, 0, ctypes.byref(exact)) == 0, lib.slim_last_error()
    for cls in (_native.EngineInfo, _native.ProgramStep):
        fn = (lambda out: lib.slim_engine_get_info(engine._handle, out)) if cls is _native.EngineInfo else (
            lambda out: lib.slim_engine_program_step(engine._handle, 0, out))
        refused(fn(as_struct(padded(cls), cls)), cls)
        small = cls(struct_size=ctypes.sizeof(cls) - 4)  # new in ABI 0.5: no older, smaller version exists
        assert fn(ctypes.byref(small)) == 1 and f"{cls._c_name_}.struct_size must be sizeof" in lib.slim_last_error().decode()


def test_lemur_and_bank_structs_larger_than_the_library_are_refused(lemur_bundle, tmp_path):
    lib = _native.lib()
    engine = se.open_engine(lemur_bundle)
    session = engine.session()
    bank = se.MemoryBank(tmp_path / "docs.bank", dim=engine.info.embed_dim)
    refused(lib.slim_bank_recovery_info(bank._handle, as_struct(padded(_native.BankRecovery), _native.BankRecovery)),
            _native.BankRecovery)
    refused(lib.slim_bank_repair(str(tmp_path / "docs.bank").encode(), as_struct(padded(_native.BankRepairReport),
                                                                                 _native.BankRepairReport)),
            _native.BankRepairReport)
    for default, fn, cls in [(lib.slim_embed_default_params, lib.slim_embed, _native.EmbedParams),
                             (lib.slim_score_default_params, lib.slim_score, _native.ScoreParams)]:
        params = padded(cls)
        ctypes.memmove(ctypes.byref(params), ctypes.byref(default()), ctypes.sizeof(cls))
        params.struct_size = ctypes.sizeof(params)
        out = _native.SlimTensor()
        refused(fn(session._handle, as_struct(params, cls), ctypes.byref(out), None), cls)
        good = default()
        good.bank = bank._handle
        refused(fn(session._handle, ctypes.byref(good), ctypes.byref(out), as_struct(padded(_native.LemurStats), _native.LemurStats)),
                _native.LemurStats)
    ids = np.zeros((1, 4), np.int64)
    frames = np.zeros((1, 1, 3, engine.info.image_size, engine.info.image_size), np.float32)
    assert session.embed(ids, frames).embeddings.shape == (1, engine.info.embed_dim)  # the binding's own structs are accepted
