"""The engine's shape: core modules form no import cycle, import on their own, never import gradio, and import
no private (`_name`) names from each other. Read from the source (imports inside functions count too)."""
from __future__ import annotations

import ast
import subprocess
import sys

import pytest
from conftest import ROOT

CORE = ROOT / "core"


PACKAGES: set[str] = set()  # module names whose source is an __init__.py


def core_modules() -> dict[str, ast.Module]:
    """'core.trainer' -> its parsed source, for every module under core/ (packages too)."""
    out = {}
    for path in sorted(CORE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        if rel.name == "__init__":
            PACKAGES.add(name)
        out[name] = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return out


def imports_of(module: str, tree: ast.Module, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported core module, names taken from it, line) for every import statement anywhere in `tree`."""
    package = module if module in PACKAGES else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name in known]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            if target in known:
                found.append((target, names, node.lineno))
            # `from . import adapters` / `from core import events`: the names are modules themselves
            found += [(f"{target}.{n}", [], node.lineno) for n in names if f"{target}.{n}" in known]
    return found


def import_graph() -> tuple[dict[str, set[str]], dict[str, ast.Module]]:
    modules = core_modules()
    known = set(modules)
    graph = {m: {t for t, _, _ in imports_of(m, tree, known) if t != m and t != "core"} for m, tree in modules.items()}
    return graph, modules


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if state.get(nxt) is None and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_import_reader_sees_relative_absolute_and_lazy_imports():
    tree = ast.parse("from . import events\nfrom .config import Config\nimport core.fileio\n"
                     "def f():\n    from .trainer import train\n")
    found = {t for t, _, _ in imports_of("core.session", tree, {"core.events", "core.config", "core.fileio",
                                                                  "core.trainer"})}
    assert found == {"core.events", "core.config", "core.fileio", "core.trainer"}


def test_core_modules_form_no_import_cycle():
    graph, _ = import_graph()
    assert len(graph) > 10  # the walk found the engine
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle among core modules (lazy imports count): " + " -> ".join(cycle)


def test_core_never_imports_gradio_and_takes_no_private_names():
    _, modules = import_graph()
    known = set(modules)
    problems = []
    for module, tree in modules.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] == "gradio" for n in names):
                    problems.append(f"{module}:{node.lineno} imports gradio")
        for target, names, line in imports_of(module, tree, known):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                problems.append(f"{module}:{line} takes private {', '.join(private)} from {target}")
    assert not problems, "\n".join(problems)


# Imports each module named on stdin in a child forked from an interpreter that has loaded the heavy third-party
# libraries but no module of this project: the child starts with none of ours, so a module that only works after
# another of ours was imported fails there, and each child costs a fork instead of a torch import.
FORKING_IMPORTER = """
import os, sys, traceback
import torch, diffusers, transformers, peft, accelerate, safetensors, numpy, PIL, yaml  # noqa: E401,F401
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel  # noqa: F401
from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: F401
import peft.tuners.lora, peft.tuners.loha, peft.tuners.lokr  # noqa: E401,F401
assert not [m for m in sys.modules if m == "core" or m.startswith("core.")]
failed = {}
for name in sys.stdin.read().split():
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            __import__(name)
            os._exit(0)
        except BaseException:
            os.write(write, traceback.format_exc().strip().splitlines()[-1].encode())
            os._exit(1)
    os.close(write)
    message = os.read(read, 4096).decode()
    os.close(read)
    if os.waitpid(pid, 0)[1]:
        failed[name] = message
print(repr(failed))
"""


def test_every_core_module_imports_on_its_own():
    """Each in a fresh process holding none of our modules, so no module works only because another one was
    imported first."""
    names = sorted(core_modules())
    out = subprocess.run([sys.executable, "-c", FORKING_IMPORTER], cwd=ROOT, input=" ".join(names),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(names) > 30 and out.stdout.strip().splitlines()[-1] == "{}", out.stdout[-2000:]
