"""Module boundaries the design promises: pure selection math, one architecture table, lazy CLI."""

from __future__ import annotations

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
    loaded = _imports_in_fresh_process("from cahp_deploy import cli")
    assert "torch" not in loaded and "onnxruntime" not in loaded


# Attribute paths of specific architectures may appear only in the architecture table.
_ARCH_PATHS = re.compile(r"\.(bert|roberta|distilbert|electra)\.|\.attention\.self\b|\bq_lin\b|\bout_lin\b")


@pytest.mark.parametrize("path", sorted(p for p in PKG.rglob("*.py") if p.name != "arch.py"), ids=lambda p: str(p.relative_to(PKG)))
def test_no_architecture_paths_outside_the_table(path):
    hits = [line.strip() for line in path.read_text().splitlines() if _ARCH_PATHS.search(line) and not line.lstrip().startswith("#")]
    assert not hits, f"{path.name} reaches into model internals: {hits[:3]}"
