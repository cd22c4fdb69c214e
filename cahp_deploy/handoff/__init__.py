"""``handoff``: turn a verified artifact dir into what a serving or edge team deploys as is.

* :mod:`~cahp_deploy.handoff.stage` — the stage (variant choice, target, card, handoff.json).
* :mod:`~cahp_deploy.handoff.triton` — Triton model repository, config.pbtxt from the graph, its parser/check.
* :mod:`~cahp_deploy.handoff.triton_text` — the text-in Triton repository (Python backend), its config check.
* :mod:`~cahp_deploy.handoff.triton_text_model` — the model.py that runs inside Triton: tokenizer + ONNX Runtime.
* :mod:`~cahp_deploy.handoff.serve` — ``serve``: a real tritonserver (the ``serve`` extra) on a triton-text dir.
* :mod:`~cahp_deploy.handoff.ort_mobile` — ORT format via onnxruntime's converter, parity vs ONNX.
* :mod:`~cahp_deploy.handoff.vocab` — vocabulary trimming (WordPiece): embeddings + tokenizer.
* :mod:`~cahp_deploy.handoff.model_card` — MODEL_CARD.md from recorded measurements only.
* :mod:`~cahp_deploy.handoff.verify` — ``verify`` for a handoff dir.
"""

from cahp_deploy.handoff.stage import HANDOFF_FILE, TARGETS, choose_variant, handoff
from cahp_deploy.handoff.verify import verify_handoff

__all__ = ["HANDOFF_FILE", "TARGETS", "choose_variant", "handoff", "verify_handoff"]
