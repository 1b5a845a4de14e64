"""The package's import structure: the exporter's modules form a DAG (no import circle, function-level
imports included), and the runtime package needs nothing of the exporter (nor torch or onnx)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np

from .conftest import random_inputs, reference_for, run_python

ROOT = Path(__file__).resolve().parents[1]
# Where each package's modules are in the source tree (pyproject.toml's wheel.packages).
PACKAGES = {"slimengine": ROOT / "runtime/python/slimengine", "slimengine.export": ROOT / "export", "slimengine.tools": ROOT / "tools"}
# The package's compiled modules (runtime/python/ext, CMakeLists.txt): leaves, importing no slimengine module.
EXTENSIONS = {"slimengine._calls": ROOT / "runtime/python/ext/calls.cpp"}


def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules | EXTENSIONS


def _imported(module: str, path: Path, node: ast.Import | ast.ImportFrom, modules: dict[str, Path]) -> set[str]:
    """The slimengine modules one import statement loads (itself excluded)."""
    if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
    else:
        base = module if path.stem == "__init__" else module.rpartition(".")[0]
        if node.level:
            parts = base.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
        else:
            base = node.module
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    found = set()
    for target in targets:
        while target and target not in modules:  # a name imported from a module, or a third-party module
            target = target.rpartition(".")[0]
        if target and target != module:
            found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    """slimengine module -> the slimengine modules it imports anywhere in its body (functions included)."""
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        graph[module] = set()
        if module in EXTENSIONS:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[module] |= _imported(module, path, node, modules)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle (its modules, the first repeated at the end), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_graph_reader_sees_function_level_imports():
    graph = import_graph()
    # Known edges of both kinds: top-level, and inside a function (export-engine's CLI imports lazily).
    assert "slimengine.export.sd3_model" in graph["slimengine.export.checkpoint"]
    assert "slimengine.export.sd3_export" in graph["slimengine.export.cli"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycles():
    graph = import_graph()
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def test_runtime_package_imports_nothing_of_the_exporter_or_tools():
    graph = import_graph()
    runtime = {m for m in graph if not m.startswith(("slimengine.export", "slimengine.tools"))}
    for module in sorted(runtime):
        bad = sorted(t for t in graph[module] if t.startswith(("slimengine.export", "slimengine.tools")))
        assert not bad, f"{module} imports {bad}: the runtime package must work without the exporter"


BLOCKER = """
import sys
BLOCKED = ("slimengine.export", "slimengine.tools", "torch", "onnx", "onnxscript", "diffusers")

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"{name} is blocked: the runtime must not need it")
        return None

sys.meta_path.insert(0, Blocker())
"""


def test_runtime_parses_policies_without_exporter_torch_or_onnx(tmp_path, distilled_bundle, distilled_checkpoint):
    """The runtime alone (the wheel's base install) takes X-Slim spec strings and schedule files."""
    model, _ = reference_for(distilled_checkpoint)
    text, pooled = random_inputs(model, batch=1, text_len=4, seed=0)
    np_file = tmp_path / "embeds.npz"
    np.savez(np_file, text=text, pooled=pooled)
    schedule = tmp_path / "schedule.json"
    schedule.write_text(json.dumps({"fully_infer_step": [0, 1]}))
    code = BLOCKER + f"""
import json
import numpy as np
import slimengine as se
from slimengine.xslim_policy import XSlimPolicy, parse_xslim_spec

policy = parse_xslim_spec("xslim:step=0.1,critical=0.3,refresh=block")
assert isinstance(policy, XSlimPolicy) and policy.critical == 0.3, policy
engine = se.open_engine({str(distilled_bundle)!r})
assert json.loads(engine.policy_json("xslim:step=0.1"))["early_warning"] == 0.1
embeds = np.load({str(np_file)!r})
session = engine.session()
for xslim in ("xslim:step=0.1,critical=0.3,refresh=block", "xslim:schedule={schedule}", policy):
    result = session.generate(embeds["text"], embeds["pooled"], seed=0, xslim=xslim)
    assert np.isfinite(result.latents).all()
loaded = sorted(m for m in sys.modules if m.startswith(("slimengine.export", "torch", "onnx.")) or m == "onnx")
assert not loaded, loaded
print("ok")
"""
    proc = run_python(code, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
