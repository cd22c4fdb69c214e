"""The one ONNX Runtime module: providers, options, sessions, feeds, logits, the smoke check."""

from __future__ import annotations

import importlib.metadata

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from cahp_deploy import onnx_runtime
from cahp_deploy.errors import CahpError


def _sum_graph(path, with_types: bool, int32_ids: bool = False):
    """logits[b] = [sum of ids, sum of mask(, sum of token types)]: outputs checkable by hand."""
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if with_types else [])
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT32 if int32_ids and n == "input_ids" else TensorProto.INT64,
                                            ["b", "s"]) for n in names]
    nodes, sums = [], []
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    for n in names:
        nodes += [helper.make_node("Cast", [n], [f"{n}_f"], to=TensorProto.FLOAT),
                  helper.make_node("ReduceSum", [f"{n}_f", "axes"], [f"{n}_s"], keepdims=1)]
        sums.append(f"{n}_s")
    nodes.append(helper.make_node("Concat", sums, ["logits"], axis=1))
    graph = helper.make_graph(nodes, "sums", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", len(names)])],
                              initializer=[axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


ENCODING = {"input_ids": [[101, 7, 102, 0], [101, 9, 9, 102]], "attention_mask": [[1, 1, 1, 0], [1, 1, 1, 1]],
            "token_type_ids": [[0, 0, 0, 0], [0, 0, 1, 1]]}


# ----------------------------------------------------------------------------- providers


def test_missing_gpu_provider_names_package_and_provider():
    with pytest.raises(CahpError) as e:
        onnx_runtime.check_provider("cuda")
    msg = str(e.value)
    assert "CUDAExecutionProvider" in msg and f"onnxruntime {importlib.metadata.version('onnxruntime')}" in msg
    assert "onnxruntime-gpu" in msg and "\n" not in msg
    with pytest.raises(CahpError, match="TensorrtExecutionProvider"):
        onnx_runtime.check_provider("tensorrt")
    with pytest.raises(CahpError, match="unknown provider 'rocm'"):
        onnx_runtime.check_provider("rocm")


def test_choices_narrow_the_providers_and_purpose_is_said():
    assert onnx_runtime.check_provider("cpu", ("cpu", "cuda")) == "CPUExecutionProvider"
    with pytest.raises(CahpError, match=r"unknown provider 'tensorrt'; choose one of: cpu, cuda"):
        onnx_runtime.check_provider("tensorrt", ("cpu", "cuda"))
    with pytest.raises(CahpError, match="needs CUDAExecutionProvider to check the fp16 model"):
        onnx_runtime.check_provider("cuda", purpose="to check the fp16 model")


def test_installed_package_prefers_the_gpu_build(monkeypatch):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda d: "1.99.0" if d == "onnxruntime-gpu" else real(d))
    assert onnx_runtime.installed_ort_package() == "onnxruntime-gpu 1.99.0"


def test_provider_lists_put_the_asked_provider_first():
    assert onnx_runtime.provider_list("cpu") == ["CPUExecutionProvider"]
    assert onnx_runtime.provider_list("cuda") == [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    trt = onnx_runtime.provider_list("tensorrt")
    assert trt[0][0] == "TensorrtExecutionProvider" and trt[1][0] == "CUDAExecutionProvider" and trt[-1] == "CPUExecutionProvider"
    assert onnx_runtime.device_of("cuda") == ("cuda", 0) and onnx_runtime.device_of("cpu") == ("cpu", 0)


def test_silent_cpu_fallback_is_an_error(tiny_onnx, monkeypatch):
    """onnxruntime falls back to the CPU when CUDA cannot start; bench must not time that as 'cuda'."""
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert onnx_runtime.check_provider("cuda") == "CUDAExecutionProvider"
    sess = onnx_runtime.load_session(tiny_onnx, "cuda", settings=onnx_runtime.thread_settings(1))
    with pytest.raises(CahpError, match="CUDAExecutionProvider was requested but the session .* runs on CPUExecutionProvider"):
        onnx_runtime.check_kept_provider(sess, "cuda", tiny_onnx)
    onnx_runtime.check_kept_provider(sess, "cpu", tiny_onnx)


# ----------------------------------------------------------------------------- options and sessions


def test_session_options_follow_thread_settings(tiny_onnx):
    opts = onnx_runtime.session_options(onnx_runtime.thread_settings(2))
    assert opts.intra_op_num_threads == 2 and opts.inter_op_num_threads == 1 and opts.log_severity_level == 3
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    sess = onnx_runtime.load_session(tiny_onnx, "cpu", settings=onnx_runtime.thread_settings(1))
    assert sess.get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(CahpError, match="--threads"):
        onnx_runtime.thread_settings(0)


def test_default_options_leave_onnxruntime_defaults():
    import onnxruntime as ort

    opts, plain = onnx_runtime.session_options(), ort.SessionOptions()
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level) == \
        (plain.intra_op_num_threads, plain.inter_op_num_threads, plain.log_severity_level)
    assert onnx_runtime.session_options(onnx_runtime.ThreadSettings(intra_op_num_threads=3)).intra_op_num_threads == 3


def test_broken_onnx_file_is_a_user_error(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(CahpError, match="onnxruntime cannot load .* on CPUExecutionProvider"):
        onnx_runtime.load_session(bad)
    with pytest.raises(Exception) as e:  # an internal graph that does not load is a bug: ORT's own error
        onnx_runtime.session(bad)
    assert not isinstance(e.value, CahpError)


def test_session_takes_a_path_bytes_or_a_model(tmp_path):
    path = _sum_graph(tmp_path / "m.onnx", with_types=False)
    model = onnx.load(str(path))
    feed = {"input_ids": np.array([[1, 2]]), "attention_mask": np.array([[1, 0]])}
    outs = [onnx_runtime.session(m).run(None, feed)[0] for m in (path, str(path), model, model.SerializeToString())]
    for out in outs:
        np.testing.assert_array_equal(out, [[3.0, 1.0]])


# ----------------------------------------------------------------------------- feeds and logits


@pytest.mark.parametrize("with_types", [True, False], ids=["bert-like", "distilbert-like"])
def test_feeds_follow_the_graph_inputs(tmp_path, with_types):
    sess = onnx_runtime.session(_sum_graph(tmp_path / "m.onnx", with_types))
    dtypes = onnx_runtime.input_dtypes(sess)
    assert list(dtypes) == ["input_ids", "attention_mask"] + (["token_type_ids"] if with_types else [])
    feed = onnx_runtime.feed(dtypes, ENCODING)
    assert set(feed) == set(dtypes) and all(v.dtype == np.int64 for v in feed.values())
    want = [[210, 3] + ([0] if with_types else []), [221, 4] + ([2] if with_types else [])]  # hand-summed
    np.testing.assert_array_equal(onnx_runtime.logits(sess, [feed]), want)


def test_feed_casts_to_the_declared_dtype_and_names_a_missing_input(tmp_path):
    sess = onnx_runtime.session(_sum_graph(tmp_path / "m.onnx", with_types=True, int32_ids=True))
    dtypes = onnx_runtime.input_dtypes(sess)
    feed = onnx_runtime.feed(dtypes, ENCODING)
    assert feed["input_ids"].dtype == np.int32 and feed["attention_mask"].dtype == np.int64
    with pytest.raises(CahpError, match="token_type_ids"):
        onnx_runtime.feed(dtypes, {k: v for k, v in ENCODING.items() if k != "token_type_ids"})


def test_logits_equal_a_direct_session_over_batches(tiny_onnx):
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    feeds = [{"input_ids": rng.integers(5, 100, (b, s)), "attention_mask": np.ones((b, s), dtype=np.int64),
              "token_type_ids": np.zeros((b, s), dtype=np.int64), "unused": np.zeros(1)} for b, s in ((1, 7), (3, 12))]
    direct = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    want = np.concatenate([direct.run(None, {k: v for k, v in f.items() if k != "unused"})[0] for f in feeds])
    got = onnx_runtime.logits(onnx_runtime.session(tiny_onnx), feeds)
    assert got.dtype == np.float32 and got.shape == (4, 3)
    np.testing.assert_array_equal(got, want)


def test_compare_by_hand():
    ref = np.array([[2.0, 0.0], [1.0, 1.05], [0.0, 3.0]], dtype=np.float32)
    got = np.array([[1.5, 0.0], [1.1, 1.0], [0.0, 3.0]], dtype=np.float32)
    res = onnx_runtime.compare(ref, got)
    assert res["max_abs_diff"] == pytest.approx(0.5) and res["argmax_mismatches"] == 1 and res["near_ties"] == 0
    assert res["argmax_agreement"] == pytest.approx(2 / 3)
    tied = onnx_runtime.compare(ref, got, tie_margin=0.1)  # row 1's margin 0.05 is a near-tie
    assert tied["argmax_mismatches"] == 0 and tied["near_ties"] == 1


# ----------------------------------------------------------------------------- the smoke check


def test_smoke_check_passes_and_names_what_went_wrong(tmp_path):
    path = _sum_graph(tmp_path / "m.onnx", with_types=False)
    inputs = [{"input_ids": [[1, 2]], "attention_mask": [[1, 1]]}]
    res = onnx_runtime.smoke_check(path, inputs, [[3.0, 2.0]], atol=1e-4)
    assert res["passed"] and res["max_abs_diff"] == 0.0 and res["atol"] == 1e-4
    assert onnx_runtime.smoke_check(path, inputs, [[2.0, 3.0]], atol=None)["argmax_mismatches"] == 1  # reported only
    with pytest.raises(CahpError, match=r"no longer matches the logits at export \(max \|diff\| 1.00e\+00 > 0.0001\)"):
        onnx_runtime.smoke_check(path, inputs, [[3.0, 1.0]], atol=1e-4, recorded="the logits at export")
    with pytest.raises(CahpError, match=r"returned logits of shape \(1, 2\) \(expected \(1, 3\)\)"):
        onnx_runtime.smoke_check(path, inputs, [[3.0, 2.0, 0.0]], atol=1e-4)
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(CahpError, match="does not run in ONNX Runtime"):
        onnx_runtime.smoke_check(tmp_path / "bad.onnx", inputs, [[3.0, 2.0]], atol=1e-4)
