"""Module boundaries the design promises: layers without circles, pure selection math, one architecture
table, lazy CLI."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "cahp_deploy"


def _imports_in_fresh_process(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"],
        capture_output=True, text=True, check=True,
    ).stdout
    return set(out.split())


def test_selection_math_does_not_import_torch():
    modules = [f"cahp_deploy.selection.{p.stem}" for p in (PKG / "selection").glob("*.py") if p.stem != "__init__"]
    loaded = _imports_in_fresh_process("\n".join(f"import {m}" for m in modules))
    assert "torch" not in loaded


def test_cli_help_is_lazy():
    loaded = _imports_in_fresh_process("from cahp_deploy.commands import cli")
    assert "torch" not in loaded and "onnxruntime" not in loaded


# Attribute paths of specific architectures may appear only in the architecture table.
_ARCH_PATHS = re.compile(r"\.(bert|roberta|distilbert|electra)\.|\.attention\.self\b|\bq_lin\b|\bout_lin\b")


@pytest.mark.parametrize("path", sorted(p for p in PKG.rglob("*.py") if p.name != "arch.py"), ids=lambda p: str(p.relative_to(PKG)))
def test_no_architecture_paths_outside_the_table(path):
    hits = [line.strip() for line in path.read_text().splitlines() if _ARCH_PATHS.search(line) and not line.lstrip().startswith("#")]
    assert not hits, f"{path.name} reaches into model internals: {hits[:3]}"


# ----------------------------------------------------------------------------- layers
# A unit is a top-level module or a subpackage of cahp_deploy. Units sit in layers, lowest first; a unit
# may import units of its own layer or of lower ones, never of a higher one (an upward import), and the
# imports between units form no circle. Every import counts, the ones inside functions too. A new unit
# must be placed here (DESIGN.md, "Folders", says why each layer sits where it does).
LAYERS: tuple[tuple[str, ...], ...] = (
    # shared pieces
    ("errors", "config", "atomic", "hashing", "schema", "progress", "formatting", "arch", "gates", "data", "paired",
     "serving_length", "hf_classifier", "onnx_runtime", "distributed", "evaluation", "shipped", "predict"),
    ("selection", "signals"),  # pure math; torch code that only collects statistics
    ("pruning",),  # surgery, load_pruned, costs
    ("modeling",),  # load_classifier: dense, or pruned through pruning.load_pruned
    ("methods", "recovery"),
    ("export",),
    ("handoff", "bench"),
    ("run", "study"),
    ("demo",),
    ("commands",),
)
_LAYER = {unit: n for n, units in enumerate(LAYERS) for unit in units}


def _unit(module: str) -> str | None:
    """``cahp_deploy.export.verify`` -> ``export``; the package root itself (``cahp_deploy``, its
    ``__version__`` and lazy ``load_pruned``) is no unit."""
    parts = module.split(".")
    if parts[0] != "cahp_deploy" or len(parts) < 2 or parts[1] in ("__version__", "load_pruned"):
        return None
    return parts[1]


def _import_edges() -> dict[tuple[str, str], list[str]]:
    """{(importing unit, imported unit): ["file:line", ...]} over every .py file of the package."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG.parent)
        module = ".".join(rel.with_suffix("").parts)
        src = _unit(module) if path.name != "__init__.py" or path.parent != PKG else None
        if src is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module] if node.module != "cahp_deploy" else [f"cahp_deploy.{a.name}" for a in node.names]
            else:
                continue  # the package uses absolute imports only
            for target in targets:
                dst = _unit(target)
                if dst is not None and dst != src:
                    edges.setdefault((src, dst), []).append(f"{rel}:{node.lineno}")
    return edges


def test_every_unit_has_a_layer():
    units = {p.stem if p.is_file() else p.name for p in PKG.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert not units - set(_LAYER), f"place these in tests/test_boundaries.py LAYERS: {sorted(units - set(_LAYER))}"


def test_no_upward_import():
    upward = {f"{a} -> {b}": where for (a, b), where in _import_edges().items() if _LAYER[b] > _LAYER[a]}
    assert not upward, f"imports from a higher layer: {upward}"


def test_no_import_circle():
    graph: dict[str, set[str]] = {}
    for a, b in _import_edges():
        graph.setdefault(a, set()).add(b)

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt == goal:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False

    circles = sorted(f"{a} <-> {b}" for a, b in _import_edges() if reaches(b, a))
    assert not circles, f"import circles between units: {circles}"


def test_the_layer_rule_catches_a_new_upward_import(monkeypatch):
    """The checks above see what they claim to: an import of export from modeling is flagged."""
    real = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: real(self, *a, **k) + (
        "\nfrom cahp_deploy.export import parity\n" if self == PKG / "modeling.py" else ""))
    with pytest.raises(AssertionError, match="modeling -> export"):
        test_no_upward_import()
    with pytest.raises(AssertionError, match="export <-> modeling|modeling <-> export"):
        test_no_import_circle()
