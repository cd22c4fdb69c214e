"""The export stage's options, declared once (:mod:`cahp_deploy.config`): ``cahp-deploy export`` and ``run``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cahp_deploy.config import DEFAULT_CONFIDENCE, StageConfig, option
from cahp_deploy.errors import CahpError

#: ``--quantize``: what a CPU deployment chooses between is the optimized graph and its INT8 version
QUANTIZE = ("int8", "none")
#: ``--exporter``: Optimum, ``torch.onnx``, or ``auto``: Optimum where it supports the installed
#: transformers (:func:`cahp_deploy.export.onnx_export.resolve_exporter`)
EXPORTERS = ("auto", "optimum", "torch")
#: rows of the train split INT8 tunes on (which MatMuls stay fp32), by default. Fewer overfit: the search
#: stops at the first node set that clears the target on them (512 was too few; DESIGN.md)
TUNING_EXAMPLES = 2048


@dataclass(frozen=True)
class ExportConfig(StageConfig):
    """Which ONNX variants to write and how INT8 is tuned and gated."""

    optimize: bool = option(True, "Also write model_optimized.onnx (ONNX Runtime fusions, chosen by timing on this "
                            "machine).", off=True, run_name=None)
    quantize: str = option("int8", "Also write model_int8.onnx (dynamic INT8 for CPU; the MatMuls it hurts most stay "
                           "fp32); none: the fp32 variants only.", choices=QUANTIZE)
    per_channel: bool | None = option(None, "INT8 weight scales per output channel or per tensor [measure both, keep "
                                      "the better].", off="--per-tensor")
    int8_max_accuracy_drop: float | None = option(
        None, "INT8 gate: the upper confidence bound of INT8's paired accuracy drop vs its fp32 graph must be at most "
        "this many points; the search tunes to it on other rows [export with --data: 0.5; run: 0.5, or the budget "
        "itself under --max-accuracy-drop, gated on the selection split].", type=float)
    int8_min_agreement: float | None = option(
        None, "INT8 gate instead: argmax agreement with fp32 at least this (for identical outputs; without --data the "
        "only gate, on random tokens) [0.90 without --data].", type=float)
    int8_smooth: float | None = option(None, "Smooth every MatMul input before INT8 (SmoothQuant-style, an explicit "
                                       "Mul) [off].", type=float, metavar="ALPHA", run_name=None)
    confidence: float = option(DEFAULT_CONFIDENCE, "One-sided confidence of the accuracy-drop upper bound the INT8 gate "
                               "uses (run: its --confidence).", type=float, run_name=None)
    int8_tuning_examples: int = option(TUNING_EXAMPLES, "INT8 tunes on this many random rows of --data's train split "
                                       "(else the first half of --split, then the gate is checked on the second half).",
                                       type=int, run_name=None)
    int8_tuning_margin: float | None = option(None, "INT8 search target = gate + margin on the tuning set [two standard "
                                              "errors of that estimate].", type=float, run_name=None)
    fp16: bool = option(False, "Also write model_fp16.onnx (for CUDA; fp32 inputs/outputs), checked on --provider.")
    opset: int | None = option(None, "ONNX opset [18, Optimum's for every supported architecture].", type=int)
    exporter: str = option("auto", "ONNX exporter: optimum (the [optimum] extra), torch (torch.onnx), or auto: optimum "
                           "when it is installed and supports the installed transformers, else torch. Same graph "
                           "contract either way.", choices=EXPORTERS, run_name=None)
    provider: str = option("cpu", "Device the artifact is made for (decides the fusions; checks fp16 there); run: "
                           "from its --provider.", choices=("cpu", "cuda"), run_name=None)
    timing: bool = option(True, "Skip timing the optimization candidates; use the provider's default choice.",
                          only_off="--no-timing")

    def __post_init__(self) -> None:
        if self.quantize is None:  # Python callers: None is export()'s "no INT8"
            object.__setattr__(self, "quantize", "none")

    def check(self) -> None:
        if self.quantize not in QUANTIZE:
            raise CahpError(f"--quantize {self.quantize!r} is not supported; choose from {', '.join(QUANTIZE)}")
        if self.quantize == "none" and self.per_channel is not None:
            flag = "--per-channel" if self.per_channel else "--per-tensor"
            raise CahpError(f"{flag} only applies to quantization; drop --quantize none or drop {flag}")
        if not 0.5 < self.confidence < 1.0:
            raise CahpError(f"{self._flag('confidence')} must be in (0.5, 1), got {self.confidence}")
        # the INT8 gate's and tuning's numbers are export()'s to check (it knows the rows they need)

    def kwargs(self) -> dict[str, Any]:
        """:func:`cahp_deploy.export.export`'s options."""
        return {"optimize": self.optimize, "quantize": None if self.quantize == "none" else self.quantize,
                "per_channel": self.per_channel, "int8_max_accuracy_drop": self.int8_max_accuracy_drop,
                "int8_min_agreement": self.int8_min_agreement, "int8_smooth": self.int8_smooth,
                "confidence": self.confidence, "int8_tuning_examples": self.int8_tuning_examples,
                "int8_tuning_margin": self.int8_tuning_margin, "fp16": self.fp16, "opset": self.opset,
                "exporter": self.exporter, "provider": self.provider, "measure": self.timing}


__all__ = ["EXPORTERS", "ExportConfig", "QUANTIZE", "TUNING_EXAMPLES"]
