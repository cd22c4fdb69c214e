"""Stage configs: each option declared once, the same flag and default in its command and in `run`."""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cahp_deploy.bench.config import BenchConfig
from cahp_deploy.config import int_tuple
from cahp_deploy.errors import CahpError
from cahp_deploy.export.config import ExportConfig
from cahp_deploy.methods.config import SelectConfig
from cahp_deploy.recovery.config import RecoverConfig
from cahp_deploy.run.config import RunConfig
from cahp_deploy.run.plan import Plan

STAGES = {"select": SelectConfig, "recover": RecoverConfig, "export": ExportConfig, "bench": BenchConfig}


def _params(name: str) -> dict[str, click.Option]:
    from cahp_deploy.commands.cli import cli

    command = cli.get_command(click.Context(cli), name)
    return {p.name: p for p in command.params if isinstance(p, click.Option)}


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_stage_option_is_the_same_in_its_command_and_in_run(stage):
    """Same flags, default and help in `cahp-deploy <stage>` and `cahp-deploy run` (renamed only where
    declared), because both are made from the one declaration."""
    config = STAGES[stage]
    command, run = _params(stage), _params("run")
    shared = 0
    for f, _, name in config._flags(run=False):
        in_run = {fld.name: n for fld, _, n in config._flags(run=True)}.get(f.name)
        if in_run is None:
            continue
        ours = next(p for p in command.values() if name in p.opts + p.secondary_opts or name[2:] == p.name)
        theirs = next(p for p in run.values() if in_run in p.opts + p.secondary_opts or in_run[2:] == p.name.replace("_", "-"))
        assert (ours.default, ours.help, ours.is_flag) == (theirs.default, theirs.help, theirs.is_flag), f.name
        shared += 1
    assert shared >= 3


def test_run_keeps_its_flag_names():
    """`run`'s flags as users type them (a rename would break their scripts)."""
    flags = {o for p in _params("run").values() for o in p.opts + p.secondary_opts}
    for flag in ("--select-split", "--eval-split", "--recover-epochs", "--recover-lr", "--recover-max-examples",
                 "--recover-split", "--no-reconstruct", "--reconstruct-rows", "--max-accuracy-drop", "--ladder",
                 "--mac-step", "--distill-data", "--confirm-split", "--quantize", "--per-tensor", "--no-timing",
                 "--variant", "--batch", "--seq", "--no-traffic", "--threads", "--eval-max-examples", "--max-length"):
        assert flag in flags, flag


def test_importing_the_configs_does_not_import_torch():
    """`--help` and option checks stay light: no torch, ONNX Runtime or transformers."""
    code = ("import sys, cahp_deploy.run.config, cahp_deploy.commands.run\n"
            "print(sorted(m for m in ('torch', 'onnxruntime', 'transformers', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_errors_name_the_flag_as_typed():
    with pytest.raises(CahpError, match="--recover-epochs must be positive"):
        RecoverConfig.from_cli({"recover_epochs": 0}, run=True)
    with pytest.raises(CahpError, match="^--epochs must be positive"):
        RecoverConfig.from_cli({"epochs": 0})
    with pytest.raises(CahpError, match="--seq takes comma-separated integers"):
        BenchConfig.from_cli({"seq": "8,x"})
    with pytest.raises(CahpError, match="--max-examples 'many' is neither a number of rows nor 'auto'"):
        SelectConfig.from_cli({"max_examples": "many"})
    with pytest.raises(CahpError, match="--per-tensor only applies to quantization"):
        ExportConfig.from_cli({"quantize": "none", "per_channel": False})


def test_run_config_from_keywords_checks_and_records():
    config = RunConfig.from_options(max_accuracy_drop=1, recover_epochs=2, batch=(1, 4), variants=["optimized"],
                                    quantize=None, select_options={"batch_size": 8})
    assert config.budget.on and config.recover.epochs == 2 and config.bench.batch == (1, 4)
    assert config.export.quantize == "none" and config.bench.variants == ("optimized",)
    record = config.record()
    assert json.loads(json.dumps(record)) == record  # JSON-able: run.json's record and the stages' cache keys
    assert record["passed"] == {"select": {"batch_size": 8}}
    assert RunConfig.from_options(**_flat(record)).record() == record  # the record gives the same config back
    with pytest.raises(TypeError, match="recover_epoch"):
        RunConfig.from_options(recover_epoch=2)


def _flat(record: dict) -> dict:
    """A run record back to `run()`'s keywords."""
    parts = {"select": SelectConfig, "recover": RecoverConfig, "export": ExportConfig, "bench": BenchConfig}
    from cahp_deploy.run.config import BudgetConfig, SharedConfig

    parts |= {"budget": BudgetConfig, "shared": SharedConfig}
    flat = {f"{k}_options": v for k, v in record["passed"].items()}
    for part, config in parts.items():
        names = {f.name: (flag.dest or n.lstrip("-").replace("-", "_")) for f, flag, n in config._flags(run=True)}
        flat |= {names[k]: v for k, v in record[part].items() if k in names}
    return flat


@pytest.mark.parametrize("flags, message", [
    ({"max_accuracy_drop": 1, "method": "random", "heads": 4}, "searches CAHP"),
    ({"max_accuracy_drop": 1, "ffn_keep_ratio": 0.5}, "--ladder heads"),
    ({"max_accuracy_drop": 1, "max_examples": "auto"}, "give a number of rows"),
    ({"select_split": "validation"}, "must differ from the selection split"),
    ({"confirm_split": "train"}, "must differ from the selection"),
    ({"mac_step": 0.05}, "--max-accuracy-drop"),
    ({"distill_data": "x"}, "--max-accuracy-drop"),
    ({"confidence": 0.4}, "--confidence must be in"),
])
def test_run_config_rejects_what_no_stage_can_check_alone(flags, message):
    with pytest.raises(CahpError, match=message):
        RunConfig.from_options(**flags)


def _plan(config: RunConfig) -> Plan:
    return Plan(config=config, model="dense-model", select_data=None, eval_data=None, decision=None,
                confirmation=None, confirm_how="", lengths={"max_length": 64}, int8_gate=1.0)


def test_the_plan_resolves_what_the_stages_get():
    budget = _plan(RunConfig.from_options(max_accuracy_drop=1, confidence=0.8, provider="tensorrt", distill=True,
                                          recover=True, seed=7))
    export = budget.export_kwargs
    assert export["confidence"] == 0.8 and export["provider"] == "cuda" and export["int8_max_accuracy_drop"] == 1.0
    assert export["max_length"] == 64 and export["split"] == "train" == export["int8_tuning_split"]
    assert budget.recover_kwargs["distill_from"] == "dense-model" and budget.recover_kwargs["qat"] is True
    assert budget.select_kwargs["options"]["max_length"] == 64 and budget.select_kwargs["seed"] == 7
    assert budget.bench_kwargs["seed"] == 7 and budget.bench_kwargs["variants"] is None
    plain = _plan(RunConfig.from_options(quantize="none", eval_max_examples=5))
    assert plain.export_kwargs["quantize"] is None and plain.export_kwargs["split"] == "validation"
    assert plain.recover_kwargs["qat"] is False and plain.bench_kwargs["max_examples"] == 5
    # under a budget with the refit, the fine-tune is off unless asked for (DESIGN.md)
    assert _plan(RunConfig.from_options(max_accuracy_drop=1)).recover_kwargs is None


@given(st.lists(st.integers(min_value=1, max_value=4096), min_size=1, max_size=6))
def test_int_tuple_reads_what_it_would_print(values):
    assert int_tuple(",".join(map(str, values))) == tuple(values) == int_tuple(values)
