"""The select stage's options, declared once (:mod:`cahp_deploy.config`): ``cahp-deploy select`` and ``run``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cahp_deploy.config import StageConfig, option
from cahp_deploy.errors import CahpError
from cahp_deploy.methods import REGISTRY

#: ``--max-examples auto``: CAHP reads the split in chunks until its selection is stable
AUTO = "auto"
FFN_METHODS = ("cahp", "gradient", "random")


def max_examples(value: Any) -> int | str | None:
    """A row count, or ``auto`` (ValueError otherwise)."""
    if value is None or value == AUTO:
        return value
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is neither a number of rows nor {AUTO!r}") from None


@dataclass(frozen=True)
class SelectConfig(StageConfig):
    """Which heads (and FFN neurons) to keep, and how the method decides.

    ``method_options()`` is what the method reads (:data:`cahp_deploy.methods.cahp.DEFAULTS` and the
    baselines' own); the budget fields cap what a method keeps.
    """

    method: str = option("cahp", "Selection method. " + ", ".join(n for n, (_, b) in REGISTRY.items() if not b)
                         + " choose how many heads (a budget, if given, caps them); the others need one.",
                         choices=tuple(REGISTRY))
    split: str = option("train", "Split the heads are selected on.", run_name="--select-split", in_command=False)
    seed: int = option(42, "Seed of every random step.", type=int)
    degree: int = option(6, "CAHP: degree of the polynomial fitted to MSS(k) before the knee search (0: no smoothing).",
                         type=int)
    pool_size: int = option(32, "CAHP: attention maps are resized to POOL_SIZE x POOL_SIZE.", type=int)
    space: str = option("tsne", "CAHP: cluster a 2-D t-SNE of the head profiles (the paper) or the profiles themselves.",
                        choices=("tsne", "full"))
    representative: str = option("salience", "CAHP: keep each cluster's most salient head, or its medoid.",
                                 choices=("salience", "medoid"), run_name=None)
    precision: str = option("fp32", "CAHP: precision of the model's evidence passes. bf16 (auto: where the CPU/GPU has "
                            "it natively) runs them ~2.5x faster but can move the selection (DESIGN.md); statistics "
                            "stay float64.", choices=("auto", "bf16", "fp32"), run_name=None)
    salience_fraction: float = option(0.25, "Leading fraction of the split's examples used for gradient salience.",
                                      type=float, run_name=None)
    max_examples: int | str | None = option(None, "Use only the first N examples of the split; 'auto' (cahp, "
                                            "select alone): stop reading once the selection is stable.",
                                            metavar="N|auto", parse=max_examples)
    heads: int | None = option(None, "Budget: keep this many heads (baselines; CAHP picks its own at the knee).",
                               type=int)
    keep_ratio: float | None = option(None, "Budget: keep this fraction of the heads.", type=float)
    allow_empty_layers: bool = option(False, "Let a layer lose all its heads (and FFN neurons) (by default each layer "
                                      "keeps its most salient one).", run_name=None)
    ffn_method: str | None = option(None, "Also select FFN neurons with this method [cahp with --method cahp, else "
                                    "gradient].", choices=FFN_METHODS)
    ffn_keep_ratio: float | None = option(None, "FFN budget: keep this fraction of the neurons; with "
                                          "--max-accuracy-drop and --ladder heads, the least any rung keeps (the "
                                          "knee's).", type=float)
    ffn_neurons: int | None = option(None, "FFN budget: keep this many neurons in all (layers may end up ragged). "
                                     "CAHP without a budget keeps each layer's knee.", type=int)
    batch_size: int | None = option(None, "Examples per forward pass (CAHP signatures; training batch of "
                                    "l0/dsp/pass) [method's default].", type=int, run_name=None)
    max_length: int | None = option(None, "Tokens per example at most [method's default].", type=int, run_name=None)
    steps: int | None = option(None, "l0/dsp/pass: optimizer steps [300].", type=int, run_name=None)
    epochs: float | None = option(None, "l0/dsp/pass: train this many epochs instead of --steps.", type=float,
                                  run_name=None)
    lr: float | None = option(None, "l0/dsp/pass: learning rate of the gate logits [the paper's].", type=float,
                              run_name=None)
    time_budget: float | None = option(None, "attattr/l0/dsp/pass: seconds of work at most; the schedule shrinks to "
                                       "fit (0: no limit) [600].", type=float, run_name=None)
    train_weights: bool | None = option(None, "l0/dsp/pass: train a copy of the model weights jointly with the gates "
                                        "(arXiv 2110.03252).", type=bool, run_name=None)
    weights_lr: float | None = option(None, "l0/dsp/pass with --train-weights: weights' learning rate [2e-5].",
                                      type=float, run_name=None)
    lambda_: float | None = option(None, "l0: weight of the expected-L0 penalty; with a budget it is searched to hit "
                                   "it [0.01].", type=float, name="--lambda", run_name=None)
    ig_steps: int | None = option(None, "attattr: integrated-gradients steps m [20].", type=int, run_name=None)
    attattr_examples: int | None = option(None, "attattr: examples attributed [200].", type=int, run_name=None)

    def check(self) -> None:
        if self.method not in REGISTRY:
            raise CahpError(f"unknown method {self.method!r}; choose from {', '.join(REGISTRY)}")
        if isinstance(self.max_examples, int) and self.max_examples < 1:
            raise CahpError(f"{self._flag('max_examples')} must be at least 1, got {self.max_examples}")
        self._positive("heads", "ffn_neurons")
        self._share("keep_ratio")
        self._share("ffn_keep_ratio")

    def method_options(self) -> dict[str, Any]:
        """What the method reads (``options`` of :func:`cahp_deploy.methods.stage.select`); a method
        ignores what is not its own, and None is the method's default."""
        options = {"degree": self.degree, "pool_size": self.pool_size, "space": self.space,
                   "representative": self.representative, "precision": self.precision,
                   "salience_fraction": self.salience_fraction, "allow_empty_layers": self.allow_empty_layers}
        extra = {"batch_size": self.batch_size, "max_length": self.max_length, "steps": self.steps, "epochs": self.epochs, "lr": self.lr,
                 "time_budget": self.time_budget, "train_weights": self.train_weights, "weights_lr": self.weights_lr,
                 "lambda": self.lambda_, "ig_steps": self.ig_steps, "attattr_examples": self.attattr_examples}
        return options | {k: v for k, v in extra.items() if v is not None}

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`cahp_deploy.methods.stage.select` (``options`` included)."""
        return {"method": self.method, "split": self.split, "seed": self.seed, "max_examples": self.max_examples,
                "heads": self.heads, "keep_ratio": self.keep_ratio, "ffn_method": self.ffn_method,
                "ffn_keep_ratio": self.ffn_keep_ratio, "ffn_neurons": self.ffn_neurons,
                "options": self.method_options()}


__all__ = ["AUTO", "FFN_METHODS", "SelectConfig", "max_examples"]
