"""``run``'s options: the accuracy budget's (declared here) and every stage's (declared by the stage).

:class:`RunConfig` composes the stage configs (:mod:`cahp_deploy.config`); ``cahp-deploy run`` takes
their options under the same names and defaults as the stage commands, and ``run()`` takes the same
names as keywords. What depends on several stages at once is checked in :meth:`RunConfig.check`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from cahp_deploy.bench.config import BenchConfig
from cahp_deploy.config import DEFAULT_CONFIDENCE, ColumnsConfig, StageConfig, option
from cahp_deploy.errors import CahpError
from cahp_deploy.export.config import ExportConfig
from cahp_deploy.methods.config import AUTO, SelectConfig
from cahp_deploy.recovery.config import RecoverConfig

#: the budget search's ladder: "macs" (progressive: ~5% of dense MACs per rung, heads and neurons
#: together, nested; :mod:`cahp_deploy.run.progressive`) or "heads" (CAHP head counts, N/12 apart)
LADDERS = ("macs", "heads")
DEFAULT_LADDER = "macs"
#: text rows each rung is distilled on, at most (``--distill-max-examples``)
DEFAULT_DISTILL_ROWS = 20000
#: Under a budget with the refit and the head ladder, each rung also keeps a share of FFN neurons
#: falling from every neuron at every head to this share at CAHP's knee (DESIGN.md).
DEFAULT_BUDGET_FFN_FLOOR = 0.5


@dataclass(frozen=True)
class BudgetConfig(StageConfig):
    """The accuracy budget: the ladder the search tests, the rows that decide and confirm, the error rate."""

    max_accuracy_drop: float | None = option(
        None, "Accuracy budget in points: test a ladder of cuts from dense down, in order, while the upper confidence "
        "bound of each candidate's paired drop vs dense, on --eval-split's decision rows, is within P (the first rung "
        "is dense itself); ship the fastest measured artifact that keeps it, dense INT8 included, confirmed on rows "
        "no decision saw.", type=float, in_command=False)
    ladder: str = option(DEFAULT_LADDER, "With --max-accuracy-drop: 'macs', the progressive ladder: each rung removes a "
                         "further ~5% of the dense MACs from heads and FFN neurons together, nested, the cheaper move "
                         "per rung measured on calibration rows; 'heads' tests CAHP head counts (FFN share falling "
                         "with them).", choices=LADDERS, in_command=False)
    mac_step: float | None = option(None, "With --ladder macs: share of the dense MACs between rungs [0.05].",
                                    type=float, in_command=False)
    search_step: int | None = option(None, "With --ladder heads: heads between the ladder's rungs [about a twelfth "
                                     "of the heads].", type=int, in_command=False)
    distill_data: str | None = option(
        None, "With --max-accuracy-drop: unlabelled in-domain text (a dataset dir or file; only the text columns are "
        "read) each rung is distilled towards dense on after the refit (logits and every layer's hidden states), "
        "kept only where it raises agreement with dense on a held-out part of it. Rows found in the evaluation or "
        "confirmation splits are dropped.", in_command=False)
    distill_split: str = option("train", "Split of --distill-data to read.", in_command=False)
    distill_max_examples: int = option(DEFAULT_DISTILL_ROWS, "At most this many --distill-data rows train each rung "
                                       "(a seeded sample).", type=int, in_command=False)
    confirm_split: str | None = option(None, "Split that confirms the shipped artifact on rows no decision saw [a "
                                       "held-out part of --eval-split].", in_command=False)
    confirm_fraction: float | None = option(None, "With --max-accuracy-drop and no --confirm-split: share of "
                                            "--eval-split held out to confirm on [0.38 at 90%: the decision and "
                                            "confirmation bounds equally wide].", type=float, in_command=False)
    confidence: float = option(DEFAULT_CONFIDENCE, "One minus the run's error rate: the search and the shipping choice "
                               "each decide at half the error rate, the confirmation at this confidence.", type=float,
                               in_command=False)

    @property
    def on(self) -> bool:
        return self.max_accuracy_drop is not None

    def check(self) -> None:
        if self.on and not 0.0 <= float(self.max_accuracy_drop) <= 100.0:
            raise CahpError(f"--max-accuracy-drop is in accuracy points and must be in [0, 100], got "
                            f"{self.max_accuracy_drop}")
        if self.ladder not in LADDERS:
            raise CahpError(f"unknown --ladder {self.ladder!r}; choose from {', '.join(LADDERS)}")
        if self.mac_step is not None and not 0.0 < self.mac_step < 0.5:
            raise CahpError(f"--mac-step is a share of the dense MACs in (0, 0.5), got {self.mac_step}")
        if self.mac_step is not None and (self.ladder != "macs" or not self.on):
            raise CahpError("--mac-step sets the progressive ladder's step; give --ladder macs and --max-accuracy-drop")
        self._positive("search_step")
        if self.search_step is not None and not self.on:
            raise CahpError("--search-step sets the accuracy budget's ladder; give --max-accuracy-drop too")
        if self.search_step is not None and self.ladder != "heads":
            raise CahpError("--search-step is the head ladder's step; with --ladder macs give --mac-step")
        if self.distill_data is not None and not self.on:
            raise CahpError("--distill-data trains each rung of the accuracy budget's ladder; give "
                            "--max-accuracy-drop too")
        if self.confirm_fraction is not None and not 0.0 < self.confirm_fraction < 1.0:
            raise CahpError(f"--confirm-fraction must be in (0, 1), got {self.confirm_fraction}")
        if not 0.5 < self.confidence < 1.0:
            raise CahpError(f"--confidence must be in (0.5, 1), got {self.confidence}")


@dataclass(frozen=True)
class SharedConfig(ColumnsConfig):
    """What every stage of a run shares: the columns (:class:`~cahp_deploy.config.ColumnsConfig`), the
    evaluation split, the serving length."""

    eval_split: str = option("validation", "Split accuracy is measured on (never the selection split).",
                             in_command=False)
    eval_max_examples: int | None = option(None, "Measure accuracy (recovery, budget, bench) on the first N rows of "
                                           "--eval-split.", type=int, in_command=False)
    max_length: int | None = option(None, "The one max length (tokens) every stage scores at and the artifact serves "
                                    "[the longest row of the data, capped at the model's positions].", type=int,
                                    in_command=False)
    distill: bool = option(False, "Recovery also distils from the dense MODEL (KL on its logits).", in_command=False)

    def check(self) -> None:
        self._positive("eval_max_examples", "max_length")


#: the configs ``run`` composes, in --help order
_PARTS = {"shared": SharedConfig, "select": SelectConfig, "recover": RecoverConfig, "budget": BudgetConfig,
          "export": ExportConfig, "bench": BenchConfig}
#: Python callers' pass-through keyword arguments to a stage (no flag)
PASS_THROUGH = ("select_options", "recover_options", "export_options", "bench_options")


@dataclass(frozen=True)
class RunConfig:
    """Every option of ``run``: one config per stage plus what they share. ``record()`` is run.json's."""

    select: SelectConfig = field(default_factory=SelectConfig)
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    shared: SharedConfig = field(default_factory=SharedConfig)
    #: further keyword arguments for a stage, verbatim (Python callers only; e.g. smaller batches in tests)
    passed: dict[str, dict[str, Any]] = field(default_factory=dict)

    @staticmethod
    def cli(command):
        """``run``'s click options: every part's, under ``run``'s names."""
        for part in reversed(list(_PARTS.values())):
            command = part.cli(run=True)(command)
        return command

    @classmethod
    def from_options(cls, **values: Any) -> RunConfig:
        """From ``run``'s flags as keywords (the CLI's parsed values, or a Python caller's); checked.
        An unknown keyword is an error, not silently ignored."""
        values = dict(values)
        passed = {name.removesuffix("_options"): dict(values.pop(name) or {}) for name in PASS_THROUGH
                  if name in values}
        parts = {name: part.from_cli(values, run=True) for name, part in _PARTS.items()}
        if values:
            raise TypeError(f"run() got unknown options: {', '.join(sorted(values))}")
        config = cls(**parts, passed=passed)
        config.check()
        return config

    def record(self) -> dict[str, Any]:
        """Every part's options (what run.json records)."""
        return {f.name: getattr(self, f.name).record() for f in fields(self) if f.name != "passed"} | \
            {"passed": {k: v for k, v in self.passed.items() if v}}

    def check(self) -> None:
        """What no part can check alone."""
        s, r, b = self.select, self.recover, self.budget
        if b.on:
            if s.method != "cahp":
                raise CahpError(f"--max-accuracy-drop searches CAHP's cluster sweep; it does not apply to "
                                f"--method {s.method}")
            if s.heads is not None or s.keep_ratio is not None:
                raise CahpError("--max-accuracy-drop chooses the number of heads itself; drop --heads / --keep-ratio")
            if s.max_examples == AUTO:
                raise CahpError("--max-examples auto reads until one selection is stable; under --max-accuracy-drop "
                                "give a number of rows")
            if b.ladder == "macs" and (s.ffn_keep_ratio is not None or s.ffn_neurons is not None):
                raise CahpError("--ffn-keep-ratio/--ffn-neurons set the head ladder's FFN cut; the progressive "
                                "ladder (--ladder macs, the default) removes neurons itself: drop them or give "
                                "--ladder heads")
            if s.ffn_method not in (None, "cahp", "gradient") or s.ffn_neurons is not None \
                    or (s.ffn_method is not None and s.ffn_keep_ratio is None):
                raise CahpError("--max-accuracy-drop searches CAHP heads and, down to a --ffn-keep-ratio floor, FFN "
                                "neurons (--ffn-method cahp or gradient); give --ffn-keep-ratio for the FFN")
        if s.split == self.shared.eval_split:
            raise CahpError(f"the evaluation split ({self.shared.eval_split!r}) must differ from the selection split "
                            f"({s.split!r}); pass --eval-split (e.g. validation or test)")
        if self.fine_tunes and self.recover_split == self.shared.eval_split:
            raise CahpError(f"the evaluation split ({self.shared.eval_split!r}) must differ from the recovery split "
                            f"({self.recover_split!r})")
        confirm = b.confirm_split
        if confirm is not None and confirm in (s.split, self.shared.eval_split,
                                               self.recover_split if self.fine_tunes else None):
            raise CahpError(f"--confirm-split {confirm!r} must differ from the selection, recovery and evaluation "
                            "splits: it confirms on rows no decision saw")
        from cahp_deploy.export.stage import INT8_TUNING_SPLIT

        if confirm == INT8_TUNING_SPLIT and self.export.quantize == "int8" and not b.on:
            raise CahpError(f"--confirm-split {confirm!r} is the split export's INT8 tuning reads; confirm on "
                            "another split (e.g. test)")

    # -- what the parts resolve together ---------------------------------------------------------

    @property
    def fine_tunes(self) -> bool:
        """Whether recovery fine-tunes: ``--recover`` as given; by default on, except under a budget
        with the refit (every fine-tune on gold labels measured moved pruned models away from dense)."""
        if self.recover.recover is not None:
            return self.recover.recover
        return not (self.budget.on and self.recover.reconstruct)

    @property
    def recover_split(self) -> str:
        return self.recover.split or self.select.split

    @property
    def ffn_keep_ratio(self) -> float | None:
        """The FFN share: as given; under a budget on the head ladder with the refit, the floor
        :data:`DEFAULT_BUDGET_FFN_FLOOR` unless any FFN option is given."""
        s = self.select
        if self.budget.on and self.recover.reconstruct and self.budget.ladder == "heads" and \
                s.ffn_keep_ratio is None and s.ffn_method is None and s.ffn_neurons is None:
            return DEFAULT_BUDGET_FFN_FLOOR
        return s.ffn_keep_ratio


__all__ = ["BudgetConfig", "DEFAULT_BUDGET_FFN_FLOOR", "DEFAULT_DISTILL_ROWS", "DEFAULT_LADDER", "LADDERS",
           "PASS_THROUGH", "RunConfig", "SharedConfig"]
