"""Text in, labels out: the Triton Python-backend model that ``handoff --target triton-text`` writes as
``model_repository/<name>/1/model.py``.

It runs inside Triton's Python stub, so it imports nothing from cahp-deploy: only numpy, onnxruntime
and tokenizers, which the stub's environment must provide (``cahp-deploy serve`` sets one up; see
docs/serving.md). Everything it needs sits next to it in the version dir::

    1/model.py          this file
    1/model.onnx        the handed-off variant
    1/tokenizer.json    the artifact's fast tokenizer (trimmed with --trim-vocab)
    1/serving.json      max_length, pad token, graph inputs, labels, limits: written and checked at handoff

Tokenization is ``cahp-deploy predict``'s: truncate at ``max_length`` (the manifest's serving length,
capped at the model's positions), pad to the longest row of the ONNX batch with the pad token, feed
exactly the inputs the graph declares; softmax in float64 (predict's) sent as FP32.

Requests (``TEXT``: TYPE_STRING, dims [1], so a request carries a batch of shape [n, 1]) are checked
one by one; a bad request gets its own error response and the others in the same dynamic batch are
still answered. Checks: every element valid UTF-8, not empty or only whitespace, at most
``max_text_chars`` characters. Triton itself rejects unknown input names, wrong datatypes and batches
larger than ``max_batch_size`` before this model sees them.

``merge_requests`` (serving.json): true runs all the texts of one dynamic batch as one ONNX batch;
false runs each request as its own. ``handoff`` sets false for INT8 graphs: their activations are
quantized per tensor with a scale taken from the whole batch, so a row's probabilities would depend on
the requests it happened to be batched with.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SETTINGS_FILE = "serving.json"
TEXT_INPUT = "TEXT"
LABEL_OUTPUT = "LABEL"
PROBS_OUTPUT = "PROBS"


class RequestError(ValueError):
    """What is wrong with one request: sent back as that request's error response."""


class TextClassifier:
    """Tokenizer + ONNX Runtime session of one version dir; no Triton needed (tests and ``verify`` use it)."""

    def __init__(self, version_dir, threads: int | None = None):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        version_dir = Path(version_dir)
        self.settings = json.loads((version_dir / SETTINGS_FILE).read_text())
        s = self.settings
        self.tokenizer = Tokenizer.from_file(str(version_dir / s["tokenizer"]))
        self.tokenizer.enable_truncation(max_length=int(s["max_length"]))
        self.tokenizer.enable_padding(pad_id=int(s["pad_id"]), pad_token=s["pad_token"])
        opts = ort.SessionOptions()
        threads = s.get("ort_threads") if threads is None else threads
        if threads:
            opts.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(str(version_dir / s["model"]), opts, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: (np.int32 if "int32" in i.type else np.int64) for i in self.session.get_inputs()}
        self.labels = list(s["labels"])

    def check(self, raw) -> list[str]:
        """The texts of one request (an array of bytes, any shape), or :class:`RequestError`."""
        texts = []
        limit = int(self.settings["max_text_chars"])
        for i, b in enumerate(np.asarray(raw, dtype=object).reshape(-1)):
            if isinstance(b, str):
                text = b
            else:
                try:
                    text = bytes(b).decode("utf-8")
                except UnicodeDecodeError as e:
                    raise RequestError(f"{TEXT_INPUT}[{i}] is not valid UTF-8 (byte {e.start})") from None
            if not text.strip():
                raise RequestError(f"{TEXT_INPUT}[{i}] is empty; send the text to classify")
            if len(text) > limit:
                raise RequestError(f"{TEXT_INPUT}[{i}] has {len(text)} characters, more than this model's limit of "
                                   f"{limit} (max_text_chars); it reads only the first {self.settings['max_length']} "
                                   "tokens anyway: cut the text before sending it")
            texts.append(text)
        if not texts:
            raise RequestError(f"{TEXT_INPUT} holds no text")
        return texts

    def probabilities(self, texts: list[str]) -> np.ndarray:
        """(len(texts), num_labels) float64 probabilities of one ONNX batch, as ``cahp-deploy predict``."""
        encs = self.tokenizer.encode_batch(texts)
        fields = {"input_ids": [e.ids for e in encs], "attention_mask": [e.attention_mask for e in encs],
                  "token_type_ids": [e.type_ids for e in encs]}
        feed = {n: np.asarray(fields[n], dtype=dt) for n, dt in self.inputs.items()}
        logits = np.asarray(self.session.run(None, feed)[0], dtype=np.float64)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        return probs / probs.sum(-1, keepdims=True)

    def run(self, batches: list[list[str]]) -> list[np.ndarray]:
        """Probabilities per request: one ONNX batch for all of them (``merge_requests``) or one each."""
        if not self.settings.get("merge_requests") or len(batches) == 1:
            return [self.probabilities(t) for t in batches]
        probs = self.probabilities([t for texts in batches for t in texts])
        out, start = [], 0
        for texts in batches:
            out.append(probs[start:start + len(texts)])
            start += len(texts)
        return out


class TritonPythonModel:
    """Triton's entry points; the work is :class:`TextClassifier`'s."""

    def initialize(self, args):
        self.model = TextClassifier(Path(args["model_repository"]) / str(args["model_version"]))

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        responses: list = [None] * len(requests)
        good, texts = [], []
        for i, request in enumerate(requests):
            try:
                tensor = pb_utils.get_input_tensor_by_name(request, TEXT_INPUT)
                if tensor is None:
                    raise RequestError(f"the request has no {TEXT_INPUT} input")
                texts.append(self.model.check(tensor.as_numpy()))
                good.append(i)
            except RequestError as e:  # the client's to fix: INVALID_ARG (HTTP 400), not INTERNAL (500)
                invalid = getattr(pb_utils.TritonError, "INVALID_ARG", None)
                error = pb_utils.TritonError(str(e)) if invalid is None else pb_utils.TritonError(str(e), invalid)
                responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=error)
        if good:
            try:
                results = self.model.run(texts)
            except Exception as e:  # ONNX Runtime failed: answer these requests with the reason, keep serving
                err = pb_utils.TritonError(f"inference failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                results = None
                for i in good:
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=err)
            if results is not None:
                for i, t, p in zip(good, texts, results):
                    names = np.array([[self.model.labels[k].encode("utf-8")] for k in p.argmax(-1)], dtype=np.object_)
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[
                        pb_utils.Tensor(LABEL_OUTPUT, names), pb_utils.Tensor(PROBS_OUTPUT, p.astype(np.float32))])
        return responses

    def finalize(self):
        self.model = None
