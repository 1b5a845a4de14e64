"""The C ABI's structs: the ctypes mirrors in the Python binding against the compiled header, params_init, and
struct_size (a struct larger than the library's is refused, not truncated; one smaller than ABI 1.0's too). A caller of
an older 1.x header against a newer library: tests/test_c_program.py (runtime/tests/old_caller.c)."""

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
from tests.conftest import bank_address

from .conftest import CApiCall

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "runtime" / "include" / "slimengine.h"


def header_structs() -> dict[str, list[str]]:
    """Every `typedef struct NAME { ... } NAME;` of the header, with its field names in order."""
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S).replace("SLIM_FUTURE_FIELD", "")
    structs = {}
    for m in re.finditer(r"typedef struct (\w+) \{(.*?)\}\s*\w+;", text, flags=re.S):
        fields = []
        for decl in filter(None, (d.strip() for d in m.group(2).split(";"))):
            fields += [re.findall(r"(\w+)\s*$", part.strip())[0] for part in decl.split(",")]
        structs[m.group(1)] = fields
    return structs


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory) -> dict[str, tuple[int, int]]:
    """{"slim_x": (sizeof, 0), "slim_x.field": (offsetof, sizeof)} as the C compiler lays the header out, for every
    struct and field header_structs() finds."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler")
    folder = tmp_path_factory.mktemp("layout")
    lines = ["#include <stddef.h>", "#include <stdio.h>", '#include "slimengine.h"', "int main(void) {"]
    for name, fields in header_structs().items():
        lines.append(f'    printf("{name} size %zu\\n", sizeof({name}));')
        lines += [f'    printf("{name}.{f} %zu %zu\\n", offsetof({name}, {f}), sizeof((({name}*)0)->{f}));' for f in fields]
    (folder / "layout.c").write_text("\n".join([*lines, "    return 0;", "}", ""]))
    subprocess.run([cc, "-std=c99", "-Wall", "-Werror", f"-I{HEADER.parent}", str(folder / "layout.c"), "-o", str(folder / "layout")],
                   check=True)
    layout = {}
    for line in subprocess.run([str(folder / "layout")], check=True, capture_output=True, text=True).stdout.splitlines():
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


def test_the_header_parser_finds_every_struct(c_layout):
    structs = header_structs()
    assert len(structs) >= 15 and "slim_generate_params" in structs  # the parser found the header's structs
    assert structs["slim_generate_params"][:2] == ["struct_size", "prompt_embeds"] and "seeds" in structs["slim_generate_params"]


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
    ctypes.memmove(ctypes.byref(params), ctypes.byref(_native.params(_native.EngineParams)), ctypes.sizeof(_native.EngineParams))
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
    ctypes.memmove(ctypes.byref(params), ctypes.byref(_native.params(_native.GenerateParams)), ctypes.sizeof(_native.GenerateParams))
    params.struct_size = ctypes.sizeof(params)
    params.prompt_embeds, params.pooled_embeds = call.tensor(call.text), call.tensor(call.pooled)
    out = call.tensor(call.out)
    refused(lib.slim_generate(session, as_struct(params, _native.GenerateParams), out, None), _native.GenerateParams)
    good = _native.params(_native.GenerateParams)
    good.prompt_embeds, good.pooled_embeds = params.prompt_embeds, params.pooled_embeds
    stats = padded(_native.GenerateStats)
    refused(lib.slim_generate(session, ctypes.byref(good), out, as_struct(stats, _native.GenerateStats)), _native.GenerateStats)
    # Below ABI 1.0's struct (there is no older version since 1.0): refused, naming what to set.
    good.struct_size = _native.GenerateParams.xslim_policy.offset
    small_stats = _native.GenerateStats(struct_size=_native.GenerateStats.flop_fraction.offset)
    for params, stats in [(good, None), (_native.params(_native.GenerateParams), small_stats)]:
        params.prompt_embeds, params.pooled_embeds = good.prompt_embeds, good.pooled_embeds
        assert lib.slim_generate(session, ctypes.byref(params), out, stats if stats is None else ctypes.byref(stats)) == 1
        name = "slim_generate_params" if stats is None else "slim_generate_stats"
        assert f"{name}.struct_size is " in lib.slim_last_error().decode() and f"set it to sizeof({name})" in lib.slim_last_error().decode()

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
        small = cls(struct_size=ctypes.sizeof(cls) - 4)
        assert fn(ctypes.byref(small)) == 1 and f"set it to sizeof({cls._c_name_})" in lib.slim_last_error().decode()


def test_lemur_and_bank_structs_larger_than_the_library_are_refused(lemur_bundle, tmp_path):
    lib = _native.lib()
    engine = se.open_engine(lemur_bundle)
    session = engine.session()
    bank = se.MemoryBank(tmp_path / "docs.bank", dim=engine.info.embed_dim)
    refused(lib.slim_bank_recovery_info(bank_address(bank), as_struct(padded(_native.BankRecovery), _native.BankRecovery)),
            _native.BankRecovery)
    refused(lib.slim_bank_repair(str(tmp_path / "docs.bank").encode(), as_struct(padded(_native.BankRepairReport),
                                                                                 _native.BankRepairReport)),
            _native.BankRepairReport)
    for fn, cls in [(lib.slim_embed, _native.EmbedParams), (lib.slim_score, _native.ScoreParams)]:
        params = padded(cls)
        ctypes.memmove(ctypes.byref(params), ctypes.byref(_native.params(cls)), ctypes.sizeof(cls))
        params.struct_size = ctypes.sizeof(params)
        out = _native.SlimTensor()
        refused(fn(session._handle, as_struct(params, cls), ctypes.byref(out), None), cls)
        good = _native.params(cls)
        good.bank = bank_address(bank)
        refused(fn(session._handle, ctypes.byref(good), ctypes.byref(out), as_struct(padded(_native.LemurStats), _native.LemurStats)),
                _native.LemurStats)
    ids = np.zeros((1, 4), np.int64)
    frames = np.zeros((1, 1, 3, engine.info.image_size, engine.info.image_size), np.float32)
    assert session.embed(ids, frames).embeddings.shape == (1, engine.info.embed_dim)  # the binding's own structs are accepted


# ---- params_init: the defaults, written into exactly the caller's struct ----

PARAMS = [_native.EngineParams, _native.GenerateParams, _native.PromptParams, _native.BankParams, _native.EmbedParams,
          _native.ScoreParams]


@pytest.mark.parametrize("cls", PARAMS, ids=lambda c: c._c_name_)
def test_params_init_writes_the_documented_defaults_and_nothing_past_the_struct(cls):
    lib, size = _native.lib(), ctypes.sizeof(cls)
    init = getattr(lib, f"slim_{cls._c_name_[5:-7]}_params_init")
    buffer = (ctypes.c_uint8 * (size + 16))(*([0xAB] * (size + 16)))
    assert init(ctypes.cast(buffer, ctypes.POINTER(cls)), size) == 0, lib.slim_last_error()
    assert bytes(buffer[size:]) == b"\xab" * 16  # nothing past the caller's struct
    value = cls.from_buffer_copy(bytes(buffer[:size]))
    assert value.struct_size == size
    defaults = {"slim_engine_params": dict(verify=0, intra_op_threads=0, device_type=_native.DEVICE_CPU, device_id=0, host_buffers=0),
                "slim_generate_params": dict(seed=0, guidance_scale=-1.0, xslim_threshold=-1.0, num_steps=0, shift=0.0),
                "slim_prompt_params": dict(prompt_count=0, height=0, width=0, seed=0, guidance_scale=-1.0, xslim_threshold=-1.0),
                "slim_bank_params": dict(dim=0, read_only=0, create=1, sync_writes=0),
                "slim_embed_params": dict(model_version=-1),
                "slim_score_params": dict(missing_policy=0, min_model_version=0)}[cls._c_name_]
    assert {k: getattr(value, k) for k in defaults} == defaults
    pointers = [n for n, t in cls._fields_ if n != "struct_size" and (t is ctypes.c_void_p or t is ctypes.c_char_p
                                                                      or issubclass(t, ctypes._Pointer) or n == "progress")]
    assert all(not getattr(value, n) for n in pointers)  # every tensor, string and callback NULL
    for bad in (0, size - 4, size + 8, 2**40):  # below 1.0's, past the library's
        assert init(ctypes.cast(buffer, ctypes.POINTER(cls)), bad) == 1
        assert f"{cls._c_name_}.struct_size is {bad}" in lib.slim_last_error().decode()
    assert init(None, size) == 1 and b"params is NULL" in lib.slim_last_error()


def test_no_struct_has_tail_padding_a_later_field_could_fill(c_layout):
    """Found by the ABI 1.0 break-it pass: slim_engine_params had 4 bytes of tail padding, where a 1.1 field could have
    gone unseen (its sizeof unchanged, so a 1.0 library would take a 1.1 caller's struct and ignore the field). Every
    struct's size is the end of its last field."""
    for name, fields in header_structs().items():
        offset, size = c_layout[f"{name}.{fields[-1]}"]
        assert c_layout[name][0] == offset + size, f"{name}: sizeof {c_layout[name][0]}, its last field ends at {offset + size}"


def test_a_result_struct_size_changed_during_the_call_is_not_read_again(distilled_bundle):
    """Found by the ABI 1.0 break-it pass: a progress callback that raised stats.struct_size during slim_generate made
    the library write that many bytes (1024: past its own struct; 2^28: a crash). The size checked is the size written."""
    engine = se.open_engine(distilled_bundle)
    call, lib = CApiCall(engine), _native.lib()
    size = ctypes.sizeof(_native.GenerateStats)
    for raised_to in (1024, 2**28):
        buffer = (ctypes.c_uint8 * 4096)(*([0xAB] * 4096))
        stats = ctypes.cast(buffer, ctypes.POINTER(_native.GenerateStats))
        stats.contents.struct_size = size

        def grow(user, phase, step, total, stats=stats, raised_to=raised_to):
            stats.contents.struct_size = raised_to
            return 0

        callback = _native.Progress(grow)
        params = _native.params(_native.GenerateParams)
        params.prompt_embeds, params.pooled_embeds, params.progress = call.tensor(call.text), call.tensor(call.pooled), callback
        assert lib.slim_generate(call.session._handle, ctypes.byref(params), call.tensor(call.out), stats) == 0, lib.slim_last_error()
        assert bytes(buffer[size:]) == b"\xab" * (4096 - size)  # nothing past the size checked before the call
        assert stats.contents.struct_size == size and stats.contents.steps == len(engine.manifest["program"]["steps"])
