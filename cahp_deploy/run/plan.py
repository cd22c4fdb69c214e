"""What ``run`` will ask of each stage, decided and checked before the first one starts.

The options are a :class:`~cahp_deploy.run.config.RunConfig` (one typed config per stage, checked when
made); :func:`make_plan` reads the model's config and every split, checks them against the options,
and returns the :class:`Plan`: the configs, the rows each decision and confirmation reads, the serving
length, and each stage's resolved keyword arguments (which are also its cache key in run.json).
Nothing is written here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cahp_deploy.errors import CahpError
from cahp_deploy.run.config import RunConfig


def _distill_rows(path, split: str, max_examples: int | None, columns: dict[str, Any], evaluation_rows: list,
                  seed: int, task_rows, tokenizer) -> dict[str, Any] | None:
    """``--distill-data``'s text: rows that appear in the evaluation or confirmation splits dropped, a judge
    part held out (:func:`cahp_deploy.recovery.distill.split_judge`), the rest cut to ``max_examples``;
    its likeness to ``task_rows`` by token length recorded (and a warning when unlike)."""
    if path is None:
        return None
    from cahp_deploy.data import load_texts, token_lengths, without_rows_of
    from cahp_deploy.recovery.distill import split_judge, text_likeness
    from cahp_deploy.recovery.stage import sample_examples

    try:
        rows = load_texts(path, split, columns["text_column"], columns["text_pair_column"])
    except CahpError as e:
        raise CahpError(f"--distill-data: {e}") from None
    rows, dropped = without_rows_of(rows, *[r for r in evaluation_rows if r is not None])
    train, judge = split_judge(rows, seed)
    train = sample_examples(train, max_examples, seed)
    likeness = text_likeness(token_lengths(tokenizer, sample_examples(rows, 2000, seed), 512),
                             token_lengths(tokenizer, sample_examples(task_rows, 2000, seed), 512))
    return {"rows": train, "judge": judge, "record": {
        **train.provenance(), "rows": len(train), "judge_rows": len(judge), "dropped_as_evaluation_rows": dropped,
        "likeness": likeness}}


def _joint_int8_gate(max_drop: float, rows: int, confidence: float) -> float | None:
    """Export's INT8 gate under an accuracy budget: the budget itself, when the rows can bound it.

    One budget for the whole artifact: whatever INT8 costs is judged against dense at P when the
    shipped artifact is chosen (:func:`cahp_deploy.run.promise.ship`), so export need not hold INT8 to
    its own 0.5 points as well (DESIGN.md: a budget-1 run otherwise kept a third of its MACs in fp32).
    None (export's default gate) when the rows are too few.
    """
    from cahp_deploy.export.int8.gate import Int8Gate

    if max_drop <= 0 or rows < Int8Gate.accuracy(max_drop, confidence, rows).rows_needed():
        return None
    return float(max_drop)


@dataclass
class Plan:
    """What each stage will be asked to do, decided (and checked) before the first one runs."""

    config: RunConfig
    model: str
    select_data: Any
    eval_data: Any
    decision: Any  # rows the budget decisions are made on
    confirmation: Any  # rows no decision saw: the shipped artifact is confirmed there
    confirm_how: str
    lengths: dict[str, Any]  # the one max length (serving_length.resolve_max_length)
    power: dict[str, Any] | None = None  # what the decision and confirmation rows can show (promise.power)
    distill: dict[str, Any] | None = None  # _distill_rows: training and judge text, their record
    int8_gate: float | None = None  # export's INT8 gate, resolved (under a budget: the budget itself)

    @property
    def max_length(self) -> int:
        return int(self.lengths["max_length"])

    @property
    def budget(self):
        return self.config.budget

    @property
    def max_accuracy_drop(self) -> float | None:
        return self.config.budget.max_accuracy_drop

    @property
    def confidence(self) -> float:
        return self.config.budget.confidence

    @property
    def columns(self) -> dict[str, Any]:
        return self.config.shared.columns

    @property
    def eval_max_examples(self) -> int | None:
        return self.config.shared.eval_max_examples

    @property
    def recover_split(self) -> str:
        return self.config.recover_split

    @property
    def seed(self) -> int:
        return self.config.select.seed

    @property
    def select_kwargs(self) -> dict[str, Any]:
        """:func:`cahp_deploy.methods.stage.select`'s arguments (the run's FFN share resolved, the
        serving length as the method's length)."""
        kwargs = self.config.select.kwargs() | {"ffn_keep_ratio": self.config.ffn_keep_ratio, **self.columns}
        kwargs["options"] = kwargs["options"] | {"max_length": self.max_length} | self.config.passed.get("select", {})
        return kwargs

    @property
    def reconstruct_kwargs(self) -> dict[str, Any] | None:
        """The refit's options; None: ``--no-reconstruct``."""
        return self.config.recover.reconstruct_kwargs()

    @property
    def recover_kwargs(self) -> dict[str, Any] | None:
        """:func:`cahp_deploy.recovery.recover`'s options; None: no fine-tune. QAT by default when INT8 is
        exported; ``--distill`` distils from the run's MODEL."""
        c = self.config
        if not c.fine_tunes:
            return None
        kwargs = c.recover.kwargs(qat_default=c.export.quantize == "int8", max_length=self.max_length)
        if c.shared.distill:
            kwargs["distill_from"] = self.model
        return kwargs | c.passed.get("recover", {})

    @property
    def export_kwargs(self) -> dict[str, Any]:
        """:func:`cahp_deploy.export.export`'s options: the run's confidence and provider, the resolved
        INT8 gate, the serving length, and the rows its checks read (:func:`_export_rows`). Under a
        budget an INT8 graph that misses its own gate is kept, marked: the shipping sequence judges it
        against dense on the decision rows like every other graph."""
        c = self.config
        export = c.export.replace(confidence=c.budget.confidence, int8_max_accuracy_drop=self.int8_gate,
                                  provider="cpu" if c.bench.provider == "cpu" else "cuda")
        keep = {"keep_failed_int8": True} if c.budget.on and c.export.quantize == "int8" else {}
        return export.kwargs() | {"max_length": self.max_length} | keep | \
            _export_rows(c.budget.on, c.select.split, c.shared.eval_split, c.shared.eval_max_examples) | \
            c.passed.get("export", {})

    @property
    def bench_kwargs(self) -> dict[str, Any]:
        """:func:`cahp_deploy.bench.bench`'s options (the run's seed; accuracy on ``--eval-max-examples``)."""
        c = self.config
        return c.bench.replace(seed=c.select.seed).kwargs() | {"max_examples": c.shared.eval_max_examples} | \
            c.passed.get("bench", {})


def _export_rows(budget: bool, select_split: str, eval_split: str, eval_max_examples: int | None) -> dict:
    """Which rows export's parity checks and INT8 gate read.

    Under a budget: the selection split (INT8 tunes on its first half and is gated on its second), so
    the gate's looks never touch the decision rows (the shipping sequence alone judges INT8 there, once)
    nor the confirmation rows. Otherwise: the evaluation split, where nothing else is decided.
    """
    if budget:
        return {"split": select_split, "int8_tuning_split": select_split}
    return {"split": eval_split, "max_examples": eval_max_examples}


def _serving_length(tokenizer, config, datasets: list, asked: int | None) -> dict[str, Any]:
    """The run's one max length (:mod:`cahp_deploy.serving_length`), from the rows of every split it reads."""
    from cahp_deploy.serving_length import resolve_max_length

    return resolve_max_length(tokenizer, config, [d for d in datasets if d is not None], asked)


def make_plan(model: str, data: str, c: RunConfig) -> Plan:
    """Read the model's config and every split, check them (labels, lengths, the FFN budget, the INT8 gate,
    the provider), and decide what each stage will be asked."""
    from transformers import AutoTokenizer

    from cahp_deploy import distributed
    from cahp_deploy.data import check_labels, load_labelled
    from cahp_deploy.modeling import load_config
    from cahp_deploy.onnx_runtime import check_provider
    from cahp_deploy.serving_length import check_max_length

    if distributed.launched() and c.select.method != "cahp":  # checked before joining: every rank fails alike
        raise CahpError(f"--method {c.select.method} runs in one process only; launch run without torchrun "
                        "(cahp is data-parallel)")
    config = load_config(model)
    check_max_length(c.shared.max_length, config)
    num_labels = int(config.num_labels)
    _check_neuron_budget(c, config)
    columns = c.shared.columns
    select_data = load_labelled(data, c.select.split, **columns)
    check_labels(select_data, num_labels, min_classes=2)
    eval_data = load_labelled(data, c.shared.eval_split, **columns)
    check_labels(eval_data, num_labels, min_classes=1)
    confirm_split = c.budget.confirm_split
    confirm_data = load_labelled(data, confirm_split, **columns) if confirm_split is not None else None
    if confirm_data is not None:
        check_labels(confirm_data, num_labels, min_classes=1)
    eval_rows = eval_data.head(c.shared.eval_max_examples)
    decision, confirmation, how, power = _decision_rows(c, eval_rows, confirm_data)
    tokenizer = AutoTokenizer.from_pretrained(model)  # the serving length and the distillation text's likeness
    lengths = _serving_length(tokenizer, config, [select_data, eval_rows, confirm_data], c.shared.max_length)
    distill = _distill_rows(c.budget.distill_data, c.budget.distill_split, c.budget.distill_max_examples, columns,
                            [eval_rows, confirm_data], c.select.seed, select_data, tokenizer)
    gate = c.export.int8_max_accuracy_drop
    if c.export.quantize == "int8":  # export's INT8 gate options, checked now rather than after select and recovery
        gate = _check_int8_gate(c, len(select_data), len(decision))
    if c.fine_tunes and c.recover_split != c.select.split:
        check_labels(load_labelled(data, c.recover_split, **columns), num_labels, min_classes=2)
    check_provider(c.bench.provider)
    return Plan(config=c, model=model, select_data=select_data, eval_data=eval_data, decision=decision,
                confirmation=confirmation, confirm_how=how, lengths=lengths, power=power, distill=distill,
                int8_gate=gate)


def _check_neuron_budget(c: RunConfig, config) -> None:
    """An FFN cut the model cannot take, checked now, not after hours of search."""
    ratio, neurons = c.ffn_keep_ratio, c.select.ffn_neurons
    if ratio is None and neurons is None:
        return
    from cahp_deploy import arch
    from cahp_deploy.selection.neurons import resolve_neuron_budget

    layers = arch.num_layers(config)
    allow_empty = c.select.allow_empty_layers or bool(c.passed.get("select", {}).get("allow_empty_layers"))
    resolve_neuron_budget(layers * arch.intermediate_size(config), layers, neurons, ratio, allow_empty)


def _decision_rows(c: RunConfig, eval_rows, confirm_data) -> tuple[Any, Any, str, dict[str, Any] | None]:
    """(decision rows, confirmation rows, how the confirmation rows were chosen, their power)."""
    from cahp_deploy.run import promise

    b = c.budget
    if b.on:
        fraction = promise.default_confirm_fraction(b.confidence) if b.confirm_fraction is None else b.confirm_fraction
        decision, confirmation, how = promise.split_eval(eval_rows, confirm_data, fraction, c.select.seed)
        power = promise.power(len(decision), len(confirmation), b.max_accuracy_drop, b.confidence,
                              confirm_data is not None)
        return decision, confirmation, how, power
    # nothing is decided on the evaluation rows: measure there (and on --confirm-split if given)
    confirmation = confirm_data if confirm_data is not None else eval_rows
    how = f"split {b.confirm_split!r}" if confirm_data is not None else "the evaluation rows"
    return eval_rows, confirmation, how, None


def _check_int8_gate(c: RunConfig, select_rows: int, decision_rows: int) -> float | None:
    """Export's INT8 gate, resolved (under a budget: the budget itself, when the rows can bound it) and
    checked against the rows it will read. Returns the accuracy gate export will get."""
    from cahp_deploy.export.parity import MAX_DATA_EXAMPLES
    from cahp_deploy.export.stage import resolve_int8_gate

    b, e = c.budget, c.export
    # under a budget INT8 is gated on the second half of the selection split (never a decision row)
    n_gate = min(select_rows // 2 if b.on else decision_rows, MAX_DATA_EXAMPLES)
    gate = e.int8_max_accuracy_drop
    if b.on and gate is None and e.int8_min_agreement is None:
        gate = _joint_int8_gate(b.max_accuracy_drop, n_gate, b.confidence)
    resolve_int8_gate(gate, e.int8_min_agreement, n_gate, b.confidence, n_gate)
    return gate


__all__ = ["Plan", "make_plan"]
