"""verify: an artifact is exactly what export wrote (hashes), and each variant still matches PyTorch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cahp_deploy.commands.cli import main
from cahp_deploy.errors import CahpError
from cahp_deploy.export import export, load_manifest, verify


@pytest.fixture(scope="module")
def artifact(tiny_models, tmp_path_factory) -> Path:
    return export(tiny_models["distilbert"], tmp_path_factory.mktemp("verify") / "art", quantize="int8", measure=False)


@pytest.fixture
def copy(artifact, tmp_path) -> Path:
    shutil.copytree(artifact, tmp_path / "art")
    return tmp_path / "art"


def test_verify_passes_and_smoke_tests_every_variant(copy, capsys):
    result = verify(copy)
    m = load_manifest(copy)
    assert result["files_checked"] == len(m["files"]) and set(result["smoke"]) == {"fp32", "optimized", "int8"}
    assert result["smoke"]["optimized"]["max_abs_diff"] <= 1e-4
    main(["verify", str(copy)])
    assert capsys.readouterr().out.startswith(f"ok: {copy}: {len(m['files'])} files match manifest.json")


def test_a_tampered_file_is_named(copy, capsys):
    raw = bytearray((copy / "model_optimized.onnx").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (copy / "model_optimized.onnx").write_bytes(bytes(raw))
    with pytest.raises(CahpError, match="model_optimized.onnx was tampered with"):
        verify(copy, smoke=False)
    with pytest.raises(SystemExit) as e:
        main(["verify", str(copy)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "model_optimized.onnx was tampered" in err


def test_a_changed_config_is_tampering_too(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["id2label"] = {"0": "x", "1": "y", "2": "z"}
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CahpError, match="config.json was tampered with"):
        verify(copy)


def test_smoke_catches_a_graph_that_no_longer_matches_pytorch(copy):
    """Hashes re-recorded after swapping the optimized graph for the int8 one: only the smoke run can tell."""
    from cahp_deploy.export.manifest import file_records, write_manifest

    shutil.copyfile(copy / "model_int8.onnx", copy / "model_optimized.onnx")
    m = load_manifest(copy)
    m["files"] = file_records(copy)
    write_manifest(copy, m)
    verify(copy, smoke=False)  # hashes agree with the (rewritten) manifest
    with pytest.raises(CahpError, match="no longer matches the PyTorch logits"):
        verify(copy)


def test_missing_unlisted_and_foreign_files(copy, tmp_path):
    shutil.copyfile(copy / "model.onnx", copy / "model_extra.onnx")
    with pytest.raises(CahpError, match="model_extra.onnx is not listed"):
        verify(copy, smoke=False)
    (copy / "model_extra.onnx").unlink()
    (copy / "model_int8.onnx").unlink()
    with pytest.raises(CahpError, match="model_int8.onnx is listed .* but missing"):
        verify(copy, smoke=False)
    with pytest.raises(CahpError, match="no manifest.json"):
        verify(tmp_path)
    with pytest.raises(CahpError, match="does not exist"):
        verify(tmp_path / "nope")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text(json.dumps({"schema": "cahp-deploy/report/1"}))
    with pytest.raises(CahpError, match="expected schema 'cahp-deploy/manifest/1'"):
        verify(tmp_path / "bad")
