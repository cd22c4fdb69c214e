"""The shared pieces every stage relies on: architecture table, gates, data, atomic outputs, top-k."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cahp_deploy import arch
from cahp_deploy.atomic import atomic_dir
from cahp_deploy.data import check_labels, iter_batches, load_labelled
from cahp_deploy.errors import CahpError
from cahp_deploy.gates import HeadGates, head_mask
from cahp_deploy.selection import Selection, keep_top_k
from cahp_deploy.selection.topk import resolve_budget
from conftest import ARCHS, build_tiny_model


@pytest.mark.parametrize("name", ARCHS)
def test_gates_equal_hf_head_mask(name):
    """Our hook must reproduce transformers 4.x head_mask exactly (the reference we replace)."""
    model = build_tiny_model(name)
    ids = torch.randint(1000, 2000, (2, 7))
    am = torch.ones_like(ids)
    am[1, 5:] = 0
    keep = [[0, 2], [], [3]]
    hm = torch.zeros(3, 4)
    for layer, heads in enumerate(keep):
        hm[layer, heads] = 1
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=am, head_mask=hm).logits
        with head_mask(model, keep):
            gated = model(input_ids=ids, attention_mask=am).logits
        dense = model(input_ids=ids, attention_mask=am).logits
    torch.testing.assert_close(gated, ref, rtol=0, atol=1e-6)
    assert (dense - gated).abs().max() > 1e-6  # the gates really did something, and detached after


def test_gate_gradients_are_per_head():
    model = build_tiny_model("bert")
    gates = HeadGates(model, [torch.ones(4, requires_grad=True) for _ in range(3)])
    ids = torch.randint(1000, 2000, (2, 6))
    with gates:
        model(input_ids=ids).logits.sum().backward()
    grads = torch.stack([g.grad for g in gates.values])
    assert grads.shape == (3, 4) and torch.all(grads != 0)


def test_arch_table_rejects_unknown_and_lists_supported():
    from transformers import AlbertConfig

    with pytest.raises(CahpError, match="unsupported architecture 'albert'.*bert"):
        arch.spec_for(AlbertConfig())


@pytest.mark.parametrize("name", ARCHS)
def test_arch_paths_resolve(name):
    model = build_tiny_model(name)
    spec = arch.spec_for(model)
    assert len(arch.layers(model)) == 3
    block = arch.layers(model)[0]
    for path in (spec.query, spec.key, spec.value, spec.output):
        assert isinstance(arch.get_path(block, path), torch.nn.Linear)
    assert getattr(arch.get_path(block, spec.self_attention), spec.heads_attr) == 4
    assert arch.heads_per_layer(model) == [4, 4, 4]


def test_max_sequence_length_and_clamped_shapes():
    """RoBERTa-family positions start after the pad id, so fewer than max_position_embeddings are usable."""
    from conftest import tiny_config

    assert arch.max_sequence_length(tiny_config("bert")) == 128
    assert arch.max_sequence_length(tiny_config("roberta")) == 127  # the tiny RoBERTa's pad id is 0
    assert arch.max_sequence_length({"model_type": "roberta", "max_position_embeddings": 514, "pad_token_id": 1}) == 512
    assert arch.max_sequence_length({"model_type": "xlm-roberta", "max_position_embeddings": 514}) == 512
    assert arch.max_sequence_length({}) == 512
    assert arch.clamp_shapes(((1, 128), (32, 16)), 64) == ((1, 64), (32, 16))


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_load_labelled_directory_and_pairs(tmp_path):
    _write(tmp_path / "train.jsonl", [{"premise": "a", "hypothesis": "b", "label": 1}, {"premise": "c", "hypothesis": "d", "label": 0}])
    data = load_labelled(tmp_path, "train")
    assert data.text_column == "premise" and data.pairs == ["b", "d"]
    assert data.labels.tolist() == [1, 0] and data.file_hashes


@pytest.mark.parametrize(
    "rows, kwargs, message",
    [
        ([{"sentence": "a", "label": 0}], {}, "column 'text' not found"),
        ([{"text": "a", "label": 0}], {"split": "validation"}, "split 'validation' not in"),
        ([{"text": "a", "label": "x"}], {}, "must be integer class ids"),
    ],
)
def test_load_labelled_errors(tmp_path, rows, kwargs, message):
    _write(tmp_path / "train.jsonl", rows)
    with pytest.raises(CahpError, match=message):
        load_labelled(tmp_path, **kwargs)


def _write_empty_parquet(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array([], pa.string()), "label": pa.array([], pa.int64())}), path)


_EMPTY_FILES = {
    "header_only.csv": lambda p: p.write_text("text,label\n"),
    "header_blank_lines.csv": lambda p: p.write_text("text,label\n\n\n"),
    "empty.csv": lambda p: p.write_text(""),
    "empty.jsonl": lambda p: p.write_text(""),
    "blank.jsonl": lambda p: p.write_text("\n  \n"),
    "empty_array.json": lambda p: p.write_text("[]\n"),
    "empty.parquet": _write_empty_parquet,
}


@pytest.mark.parametrize("name", list(_EMPTY_FILES))
@pytest.mark.parametrize("as_split", [False, True], ids=["file", "split-in-dir"])
def test_a_split_file_without_rows_is_a_one_line_error_naming_it(tmp_path, name, as_split):
    """Zero-row files make `datasets` raise raw errors from deep inside; the user gets which file, and why."""
    suffix = name.rsplit(".", 1)[1]
    path = tmp_path / (f"validation.{suffix}" if as_split else name)
    _EMPTY_FILES[name](path)
    with pytest.raises(CahpError) as e:
        load_labelled(tmp_path if as_split else path, "validation")
    message = str(e.value)
    assert "\n" not in message and str(path) in message and "no rows" in message


def test_missing_data_path():
    with pytest.raises(CahpError, match="does not exist"):
        load_labelled("./no/such/dir")


def test_check_labels(tmp_path):
    _write(tmp_path / "train.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 0}])
    data = load_labelled(tmp_path)
    with pytest.raises(CahpError, match="1 class"):
        check_labels(data, 3, min_classes=2)
    data.labels[1] = 7
    with pytest.raises(CahpError, match="outside the model's 3 labels"):
        check_labels(data, 3)


def test_iter_batches_bucket_by_length(tiny_data):
    from transformers import AutoTokenizer

    from conftest import tokenizer_dir

    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    data = load_labelled(tiny_data, "train")
    seen, widths = [], []
    for idx, enc, labels in iter_batches(tok, data, batch_size=8):
        seen.extend(idx.tolist())
        widths.append(enc["input_ids"].shape[1])
        assert labels.tolist() == data.labels[idx].tolist()
    assert sorted(seen) == list(range(len(data)))
    assert widths == sorted(widths)  # length-bucketed: padding grows monotonically


def test_atomic_dir_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as tmp:
            (tmp / "half.txt").write_text("x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(target) as tmp:
        (tmp / "done.txt").write_text("x")
    assert (target / "done.txt").exists()
    with pytest.raises(CahpError, match="already exists; pass --force"):
        with atomic_dir(target):
            pass
    with atomic_dir(target, force=True) as tmp:
        (tmp / "new.txt").write_text("y")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_keep_top_k_global_and_guarded():
    scores = np.array([[9.0, 8.0, 7.0], [1.0, 0.5, 0.2], [6.0, 5.0, 0.1]])
    assert keep_top_k(scores, 3) == [[0, 1, 2], [], []]
    assert keep_top_k(scores, 3, min_per_layer=1) == [[0], [0], [0]]
    assert keep_top_k(scores, 4, min_per_layer=1) == [[0, 1], [0], [0]]
    with pytest.raises(CahpError):
        keep_top_k(scores, 2, min_per_layer=1)


def test_keep_top_k_ties_are_deterministic():
    assert keep_top_k(np.ones((2, 2)), 3) == [[0, 1], [0]]


@pytest.mark.parametrize(
    "kwargs, expected",
    [({"heads": 5}, 5), ({"keep_ratio": 0.25}, 18), ({"budget_from": 13}, 13), ({}, None)],
)
def test_resolve_budget(kwargs, expected):
    assert resolve_budget(72, **kwargs) == expected


@pytest.mark.parametrize("kwargs", [{"heads": 0}, {"heads": 73}, {"keep_ratio": 1.5}, {"heads": 3, "keep_ratio": 0.5}])
def test_resolve_budget_errors(kwargs):
    with pytest.raises(CahpError):
        resolve_budget(72, **kwargs)


def test_selection_json_round_trip(tmp_path):
    sel = Selection(method="cahp", kept_heads=[[2, 0], [], [1]], num_heads_total=9, heads_per_layer=3,
                    knee=3, mss_curve={2: 0.5, 3: 0.7}, seed=7)
    sel.to_json(tmp_path / "s.json")
    d = json.loads((tmp_path / "s.json").read_text())
    assert d["schema"] == "cahp-deploy/selection/2" and d["num_heads_kept"] == 3 and d["kept_heads"][0] == [0, 2]
    assert d["kept_neurons"] is None and d["num_neurons_kept"] is None
    back = Selection.from_json(tmp_path / "s.json")
    assert back.to_dict() == sel.to_dict()
    # a version-1 file (no neuron fields) is still read
    old = {k: v for k, v in d.items() if k not in ("kept_neurons", "num_neurons_kept", "num_neurons_total",
                                                   "neurons_per_layer", "ffn")}
    (tmp_path / "v1.json").write_text(json.dumps({**old, "schema": "cahp-deploy/selection/1"}))
    assert Selection.from_json(tmp_path / "v1.json").to_dict() == sel.to_dict()
    # neurons round-trip
    sel2 = Selection(method="cahp", kept_heads=[[0], [1], [2]], num_heads_total=9, heads_per_layer=3,
                     kept_neurons=[[3, 1], [], [0]], neurons_per_layer=4, ffn={"method": "gradient"})
    d2 = sel2.to_dict()
    assert d2["kept_neurons"] == [[1, 3], [], [0]] and d2["num_neurons_kept"] == 3 and d2["num_neurons_total"] == 12
    assert Selection.from_dict(json.loads(json.dumps(d2))).to_dict() == d2
    d["schema"] = "cahp-deploy/selection/9"
    (tmp_path / "s.json").write_text(json.dumps(d))
    with pytest.raises(CahpError, match="expected schema"):
        Selection.from_json(tmp_path / "s.json")


def test_atomic_outputs_get_normal_permissions(tmp_path):
    import os
    import stat

    from cahp_deploy.atomic import atomic_file

    with atomic_dir(tmp_path / "art") as tmp:
        (tmp / "a").write_text("x")
    with atomic_file(tmp_path / "f.json") as tmp:
        tmp.write_text("{}")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "art").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == 0o666 & ~umask
