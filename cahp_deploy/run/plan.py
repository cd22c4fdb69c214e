"""What ``run`` will ask of each stage, decided and checked before the first one starts.

:class:`RunOptions` holds ``run``'s keyword options as given; :func:`check_options` rejects what is wrong
in them alone, :func:`make_plan` reads the model's config and every split, checks them, and returns the
:class:`Plan`: the rows each decision and confirmation reads, the serving length, and each stage's
keyword arguments. Nothing is written here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from cahp_deploy.errors import CahpError
from cahp_deploy.paired import DEFAULT_CONFIDENCE

#: Variants exported for both models: what a CPU deployment would choose between.
DEFAULT_QUANTIZE = "int8"
#: The bench grid of `run`: one latency-bound and one throughput-bound shape at a typical length.
DEFAULT_BATCHES = (1, 32)
DEFAULT_SEQS = (128,)
#: Under a budget with the refit, the ladder is joint by default: each rung also keeps a share of FFN
#: neurons falling from every neuron at every head to this share at CAHP's knee (FFN neurons are ~2/3
#: of the MACs; measured on SST-5, 48 heads refit: 83 rows disagree with dense, 48 heads + 75% of the
#: neurons refit: 90).
DEFAULT_BUDGET_FFN_FLOOR = 0.5
#: the budget search's ladder: "macs" (progressive: ~5% of dense MACs per rung, heads and neurons
#: together, nested; :mod:`cahp_deploy.run.progressive`) or "heads" (CAHP head counts, N/12 apart)
LADDERS = ("macs", "heads")
DEFAULT_LADDER = "macs"


#: text rows each rung is distilled on, at most (``--distill-max-examples``)
DEFAULT_DISTILL_ROWS = 20000


def _distill_rows(path, split: str, max_examples: int | None, max_drop: float | None, columns: dict[str, Any],
                  evaluation_rows: list, seed: int) -> dict[str, Any] | None:
    """``--distill-data``'s text: rows that appear in the evaluation or confirmation splits dropped, a judge
    part held out (:func:`cahp_deploy.recovery.distill.split_judge`), the rest cut to ``max_examples``."""
    if path is None:
        return None
    if max_drop is None:
        raise CahpError("--distill-data trains each rung of the accuracy budget's ladder; give --max-accuracy-drop too")
    from cahp_deploy.data import load_texts, without_rows_of
    from cahp_deploy.recovery.distill import split_judge
    from cahp_deploy.recovery.stage import sample_examples

    try:
        rows = load_texts(path, split, columns["text_column"], columns["text_pair_column"])
    except CahpError as e:
        raise CahpError(f"--distill-data: {e}") from None
    rows, dropped = without_rows_of(rows, *[r for r in evaluation_rows if r is not None])
    train, judge = split_judge(rows, seed)
    train = sample_examples(train, max_examples, seed)
    return {"rows": train, "judge": judge, "record": {
        **train.provenance(), "rows": len(train), "judge_rows": len(judge), "dropped_as_evaluation_rows": dropped}}


def _check_ladder(ladder: str, mac_step: float | None, search_step: int | None, max_drop: float | None) -> None:
    if ladder not in LADDERS:
        raise CahpError(f"unknown --ladder {ladder!r}; choose from {', '.join(LADDERS)}")
    if mac_step is not None and not 0.0 < mac_step < 0.5:
        raise CahpError(f"--mac-step is a share of the dense MACs in (0, 0.5), got {mac_step}")
    if mac_step is not None and (ladder != "macs" or max_drop is None):
        raise CahpError("--mac-step sets the progressive ladder's step; give --ladder macs and --max-accuracy-drop")
    if search_step is not None and ladder != "heads":
        raise CahpError("--search-step is the head ladder's step; with --ladder macs give --mac-step")


#: The reference pipeline's recovery: 3 epochs of fine-tuning after pruning.
DEFAULT_RECOVER_EPOCHS = 3


def _default_variants(quantize: str | None) -> list[str]:
    """Time what a CPU deployment chooses between: the optimized graph and its INT8 version."""
    return ["optimized", "int8"] if quantize == "int8" else ["optimized"]


def _prune_none(d: dict[str, Any]) -> dict[str, Any]:
    """Options left at None are the stage's own defaults: pass them on only when set."""
    return {k: v for k, v in d.items() if v is not None}


def _joint_int8_gate(max_drop: float, rows: int, confidence: float) -> float | None:
    """Export's INT8 gate under an accuracy budget: the budget itself, when the rows can bound it.

    One budget for the whole artifact: whatever INT8 costs is judged against dense at P when the
    shipped artifact is chosen (:func:`cahp_deploy.run.promise.ship`), so export need not hold INT8 to
    its own 0.5 points as well. Measured: the dense SST-5 model's all-INT8 graph missed that 0.5 by
    0.03 points on the 1,101 decision rows (upper bound 0.53), so a budget-1 run kept a third of its
    MACs in fp32 (1.26x instead of ~2x). None (export's default gate) when the rows are too few.
    """
    from cahp_deploy.export.int8.gate import Int8Gate

    if max_drop <= 0 or rows < Int8Gate.accuracy(max_drop, confidence, rows).rows_needed():
        return None
    return float(max_drop)


def _check_positive(**values: float | None) -> None:
    """Numeric options a later stage would reject: rejected now, before hours of earlier stages."""
    for name, value in values.items():
        if value is not None and not value > 0:
            raise CahpError(f"--{name.replace('_', '-')} must be positive, got {value}")


def _check_budget_options(max_drop: float | None, method: str, heads: int | None, keep_ratio: float | None) -> None:
    if max_drop is None:
        return
    if method != "cahp":
        raise CahpError(f"--max-accuracy-drop searches CAHP's cluster sweep; it does not apply to --method {method}")
    if heads is not None or keep_ratio is not None:
        raise CahpError("--max-accuracy-drop chooses the number of heads itself; drop --heads / --keep-ratio")
    if not 0.0 <= float(max_drop) <= 100.0:
        raise CahpError(f"--max-accuracy-drop is in accuracy points and must be in [0, 100], got {max_drop}")


@dataclass
class Plan:
    """What each stage will be asked to do, decided (and checked) before the first one runs."""

    select_data: Any
    eval_data: Any
    columns: dict[str, Any]
    select_kwargs: dict[str, Any]
    recover_split: str
    recover_kwargs: dict[str, Any] | None  # None: --no-recover
    max_accuracy_drop: float | None
    eval_max_examples: int | None
    export_kwargs: dict[str, Any]
    bench_kwargs: dict[str, Any]
    decision: Any = None  # rows the budget decisions are made on
    confirmation: Any = None  # rows no decision saw: the shipped artifact is confirmed there
    confirm_how: str = ""
    confidence: float = DEFAULT_CONFIDENCE
    ffn_keep_ratio: float | None = None
    ffn_method: str = "cahp"
    search_step: int | None = None
    ladder: str = "heads"
    mac_step: float | None = None
    distill: dict[str, Any] | None = None  # _distill_rows: training and judge text, their record
    lengths: dict[str, Any] | None = None  # the one max length (serving_length.resolve_max_length)
    power: dict[str, Any] | None = None  # what the decision and confirmation rows can show (promise.power)
    reconstruct_kwargs: dict[str, Any] | None = None  # None: --no-reconstruct

    @property
    def max_length(self) -> int:
        return int(self.lengths["max_length"])


def _export_rows(max_drop: float | None, select_split: str, eval_split: str, eval_max_examples: int | None) -> dict:
    """Which rows export's parity checks and INT8 gate read.

    Under a budget: the selection split (INT8 tunes on its first half and is gated on its second), so
    the gate's looks never touch the decision rows (the shipping sequence alone judges INT8 there, once)
    nor the confirmation rows. Otherwise: the evaluation split, where nothing else is decided.
    """
    if max_drop is not None:
        return {"split": select_split, "int8_tuning_split": select_split}
    return _prune_none({"split": eval_split, "max_examples": eval_max_examples})


def _serving_length(model: str, config, datasets: list, asked: int | None) -> dict[str, Any]:
    """The run's one max length (:mod:`cahp_deploy.serving_length`), from the rows of every split it reads."""
    from transformers import AutoTokenizer

    from cahp_deploy.serving_length import resolve_max_length

    tokenizer = AutoTokenizer.from_pretrained(model)
    return resolve_max_length(tokenizer, config, [d for d in datasets if d is not None], asked)

@dataclass
class RunOptions:
    """``run``'s keyword options (its signature holds their defaults); :func:`check_options` and
    :func:`make_plan` resolve the ones left at None that depend on others."""

    method: str
    select_split: str
    eval_split: str
    text_column: str | None
    text_pair_column: str | None
    label_column: str
    seed: int
    degree: int | None
    pool_size: int | None
    space: str | None
    heads: int | None
    keep_ratio: float | None
    max_examples: int | None
    ffn_method: str | None
    ffn_keep_ratio: float | None
    ffn_neurons: int | None
    recover: bool | None
    reconstruct: bool
    reconstruct_rows: int | None
    recover_epochs: int
    recover_lr: float | None
    recover_max_examples: int | None
    recover_split: str | None
    distill: bool
    qat: bool | None
    max_accuracy_drop: float | None
    search_step: int | None
    ladder: str
    mac_step: float | None
    distill_data: str | os.PathLike | None
    distill_split: str
    distill_max_examples: int | None
    confirm_split: str | None
    confirm_fraction: float | None
    confidence: float | None
    quantize: str | None
    per_channel: bool | None
    int8_max_accuracy_drop: float | None
    int8_min_agreement: float | None
    fp16: bool
    opset: int | None
    timing: bool
    provider: str
    batch: tuple[int, ...] | None
    seq: tuple[int, ...] | None
    min_seconds: float | None
    min_reps: int | None
    warmup: int | None
    traffic: bool
    threads: int | None
    variants: tuple[str, ...] | None
    eval_max_examples: int | None
    max_length: int | None
    select_options: dict[str, Any] | None
    recover_options: dict[str, Any] | None
    export_options: dict[str, Any] | None
    bench_options: dict[str, Any] | None


def check_options(o: RunOptions) -> None:
    """Reject what is wrong in the options alone (no file read yet), and resolve ``recover``,
    ``recover_split`` and the head ladder's FFN floor, which depend on other options."""
    from cahp_deploy import distributed

    if distributed.launched() and o.method != "cahp":  # checked before joining: every rank fails alike
        raise CahpError(f"--method {o.method} runs in one process only; launch run without torchrun "
                        "(cahp is data-parallel)")
    budget = o.max_accuracy_drop is not None
    if o.recover is None:
        o.recover = not (budget and o.reconstruct)
    if o.ladder == "macs" and budget and (o.ffn_keep_ratio is not None or o.ffn_neurons is not None):
        raise CahpError("--ffn-keep-ratio/--ffn-neurons set the head ladder's FFN cut; the progressive ladder "
                        "(--ladder macs, the default) removes neurons itself: drop them or give --ladder heads")
    if budget and o.reconstruct and o.ffn_keep_ratio is None and o.ffn_method is None \
            and o.ffn_neurons is None and o.ladder == "heads":
        o.ffn_keep_ratio = DEFAULT_BUDGET_FFN_FLOOR  # the refit carries FFN cuts too: the ladder thins both
    if o.reconstruct_rows is not None and (not o.reconstruct or o.reconstruct_rows < 2):
        raise CahpError(f"--reconstruct-rows {o.reconstruct_rows} needs --reconstruct and at least 2 rows")
    o.recover_split = o.recover_split or o.select_split
    _check_splits(o)
    _check_budget_options(o.max_accuracy_drop, o.method, o.heads, o.keep_ratio)
    if budget and (o.ffn_method not in (None, "cahp", "gradient") or o.ffn_neurons is not None
                   or (o.ffn_method is not None and o.ffn_keep_ratio is None)):
        raise CahpError("--max-accuracy-drop searches CAHP heads and, down to a --ffn-keep-ratio floor, FFN neurons "
                        "(--ffn-method cahp or gradient); give --ffn-keep-ratio for the FFN")
    if o.confirm_split is not None and o.confirm_split in (o.select_split, o.eval_split,
                                                           o.recover_split if o.recover else None):
        raise CahpError(f"--confirm-split {o.confirm_split!r} must differ from the selection, recovery and evaluation "
                        "splits: it confirms on rows no decision saw")
    from cahp_deploy.export.stage import INT8_TUNING_SPLIT

    if o.confirm_split == INT8_TUNING_SPLIT and o.quantize == "int8" and not budget:
        raise CahpError(f"--confirm-split {o.confirm_split!r} is the split export's INT8 tuning reads; confirm on "
                        "another split (e.g. test)")
    if o.confirm_fraction is not None and not 0.0 < o.confirm_fraction < 1.0:
        raise CahpError(f"--confirm-fraction must be in (0, 1), got {o.confirm_fraction}")
    if o.confidence is not None and not 0.5 < o.confidence < 1.0:
        raise CahpError(f"--confidence must be in (0.5, 1), got {o.confidence}")
    _check_positive(recover_epochs=o.recover_epochs if o.recover else None, recover_lr=o.recover_lr,
                    recover_max_examples=o.recover_max_examples, eval_max_examples=o.eval_max_examples,
                    search_step=o.search_step)
    if o.search_step is not None and not budget:
        raise CahpError("--search-step sets the accuracy budget's ladder; give --max-accuracy-drop too")
    _check_ladder(o.ladder, o.mac_step, o.search_step, o.max_accuracy_drop)


def _check_splits(o: RunOptions) -> None:
    """Evaluation reads rows of its own: neither selection's nor recovery's."""
    if o.select_split == o.eval_split:
        raise CahpError(
            f"the evaluation split ({o.eval_split!r}) must differ from the selection split "
            f"({o.select_split!r}); pass --eval-split (e.g. validation or test)"
        )
    if o.recover and o.recover_split == o.eval_split:
        raise CahpError(
            f"the evaluation split ({o.eval_split!r}) must differ from the recovery split ({o.recover_split!r})"
        )


def make_plan(model: str, data: str, o: RunOptions) -> Plan:
    """Read the model's config and every split, check them (labels, lengths, the FFN budget, the INT8 gate,
    the provider), and decide what each stage will be asked. ``o`` has passed :func:`check_options`."""
    from cahp_deploy.data import check_labels, load_labelled
    from cahp_deploy.modeling import load_config
    from cahp_deploy.onnx_runtime import check_provider
    from cahp_deploy.serving_length import check_max_length

    config = load_config(model)
    check_max_length(o.max_length, config)
    num_labels = int(config.num_labels)
    _check_neuron_budget(o, config)
    columns = dict(text_column=o.text_column, text_pair_column=o.text_pair_column, label_column=o.label_column)
    select_data = load_labelled(data, o.select_split, **columns)
    check_labels(select_data, num_labels, min_classes=2)
    eval_data = load_labelled(data, o.eval_split, **columns)
    check_labels(eval_data, num_labels, min_classes=1)
    confirm_data = load_labelled(data, o.confirm_split, **columns) if o.confirm_split is not None else None
    if confirm_data is not None:
        check_labels(confirm_data, num_labels, min_classes=1)
    eval_rows = eval_data.head(o.eval_max_examples)
    o.confidence = DEFAULT_CONFIDENCE if o.confidence is None else float(o.confidence)
    decision, confirmation, how, power = _decision_rows(o, eval_rows, confirm_data)
    lengths = _serving_length(model, config, [select_data, eval_rows, confirm_data], o.max_length)
    distill = _distill_rows(o.distill_data, o.distill_split, o.distill_max_examples, o.max_accuracy_drop, columns,
                            [eval_rows, confirm_data], o.seed)
    if o.quantize == "int8":  # export's INT8 gate options, checked now rather than after select and recovery
        _check_int8_gate(o, len(select_data), len(decision))
    if o.recover and o.recover_split != o.select_split:
        check_labels(load_labelled(data, o.recover_split, **columns), num_labels, min_classes=2)
    check_provider(o.provider)
    return Plan(
        select_data=select_data, eval_data=eval_data, columns=columns, recover_split=o.recover_split,
        max_accuracy_drop=o.max_accuracy_drop, eval_max_examples=o.eval_max_examples,
        decision=decision, confirmation=confirmation, confirm_how=how, confidence=o.confidence,
        ffn_keep_ratio=o.ffn_keep_ratio, ffn_method=o.ffn_method or "cahp", search_step=o.search_step,
        ladder=o.ladder, mac_step=o.mac_step, distill=distill, lengths=lengths, power=power,
        **_stage_kwargs(model, o, columns, lengths["max_length"]),
    )


def _check_neuron_budget(o: RunOptions, config) -> None:
    """An FFN cut the model cannot take, checked now, not after hours of search."""
    if o.ffn_keep_ratio is None and o.ffn_neurons is None:
        return
    from cahp_deploy import arch
    from cahp_deploy.selection.neurons import resolve_neuron_budget

    layers = arch.num_layers(config)
    resolve_neuron_budget(layers * arch.intermediate_size(config), layers, o.ffn_neurons, o.ffn_keep_ratio,
                          bool((o.select_options or {}).get("allow_empty_layers")))


def _decision_rows(o: RunOptions, eval_rows, confirm_data) -> tuple[Any, Any, str, dict[str, Any] | None]:
    """(decision rows, confirmation rows, how the confirmation rows were chosen, their power)."""
    from cahp_deploy.run import promise

    if o.max_accuracy_drop is not None:
        fraction = promise.default_confirm_fraction(o.confidence) if o.confirm_fraction is None else o.confirm_fraction
        decision, confirmation, how = promise.split_eval(eval_rows, confirm_data, fraction, o.seed)
        power = promise.power(len(decision), len(confirmation), o.max_accuracy_drop, o.confidence,
                              confirm_data is not None)
        return decision, confirmation, how, power
    # nothing is decided on the evaluation rows: measure there (and on --confirm-split if given)
    confirmation = confirm_data if confirm_data is not None else eval_rows
    how = f"split {o.confirm_split!r}" if confirm_data is not None else "the evaluation rows"
    return eval_rows, confirmation, how, None


def _check_int8_gate(o: RunOptions, select_rows: int, decision_rows: int) -> None:
    """Export's INT8 gate, resolved (under a budget: the budget itself, when the rows can bound it) and
    checked against the rows it will read."""
    from cahp_deploy.export.parity import MAX_DATA_EXAMPLES
    from cahp_deploy.export.stage import resolve_int8_gate

    # under a budget INT8 is gated on the second half of the selection split (never a decision row)
    n_gate = min(select_rows // 2 if o.max_accuracy_drop is not None else decision_rows, MAX_DATA_EXAMPLES)
    if o.max_accuracy_drop is not None and o.int8_max_accuracy_drop is None and o.int8_min_agreement is None:
        o.int8_max_accuracy_drop = _joint_int8_gate(o.max_accuracy_drop, n_gate, o.confidence)
    resolve_int8_gate(o.int8_max_accuracy_drop, o.int8_min_agreement, n_gate, o.confidence, n_gate)


def _stage_kwargs(model: str, o: RunOptions, columns: dict[str, Any], serve: int) -> dict[str, Any]:
    """Each stage's keyword arguments (options left at None are the stage's own defaults)."""
    method_options = _prune_none(dict(degree=o.degree, pool_size=o.pool_size, space=o.space)) \
        | {"max_length": serve} | (o.select_options or {})
    select_kwargs = _prune_none(dict(
        method=o.method, split=o.select_split, seed=o.seed, heads=o.heads, keep_ratio=o.keep_ratio,
        max_examples=o.max_examples, ffn_method=o.ffn_method, ffn_keep_ratio=o.ffn_keep_ratio,
        ffn_neurons=o.ffn_neurons, **columns,
    )) | ({"options": method_options} if method_options else {})
    reconstruct_kwargs = None if not o.reconstruct else _prune_none(dict(max_examples=o.reconstruct_rows))
    recover_kwargs = None if not o.recover else _prune_none(dict(
        epochs=o.recover_epochs, lr=o.recover_lr, max_examples=o.recover_max_examples,
        distill_from=model if o.distill else None, max_length=serve,
    )) | ({"qat": True} if (o.quantize == "int8" if o.qat is None else o.qat) else {}) | (o.recover_options or {})
    export_kwargs = _prune_none(dict(
        optimize=True, quantize=o.quantize, per_channel=o.per_channel, int8_min_agreement=o.int8_min_agreement,
        int8_max_accuracy_drop=o.int8_max_accuracy_drop, confidence=o.confidence, fp16=o.fp16, opset=o.opset,
        provider="cpu" if o.provider == "cpu" else "cuda", measure=o.timing, max_length=serve,
    )) | _export_rows(o.max_accuracy_drop, o.select_split, o.eval_split, o.eval_max_examples) \
        | (o.export_options or {})
    bench_kwargs = _prune_none(dict(
        provider=o.provider, batches=o.batch or DEFAULT_BATCHES, seqs=o.seq or DEFAULT_SEQS,
        variants=list(o.variants) if o.variants else _default_variants(o.quantize),
        min_seconds=o.min_seconds, min_reps=o.min_reps, warmup=o.warmup, traffic=o.traffic, threads=o.threads,
        max_examples=o.eval_max_examples, seed=o.seed,
    )) | (o.bench_options or {})
    return dict(select_kwargs=select_kwargs, reconstruct_kwargs=reconstruct_kwargs, recover_kwargs=recover_kwargs,
                export_kwargs=export_kwargs, bench_kwargs=bench_kwargs)


__all__ = ["DEFAULT_LADDER", "DEFAULT_QUANTIZE", "LADDERS", "Plan", "RunOptions", "check_options", "make_plan"]
