"""The ``prune`` stage: selection.json + dense model dir -> pruned model dir.

Everything the user can get wrong is checked before any weight is touched or any file written:
the output path, the selection file, that it was made for this model (layers, heads per layer,
content hash), and its indices. The result is written atomically: model.safetensors +
config.json (with ``cahp_kept_heads``), tokenizer files, pruning.json.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from cahp_deploy import arch, schema
from cahp_deploy.atomic import atomic_dir, check_output_path
from cahp_deploy.errors import CahpError
from cahp_deploy.hashing import sha256_dir, sha256_file, sha256_json
from cahp_deploy.hf_classifier import count_parameters, is_pruned, load_config, load_dense, load_tokenizer
from cahp_deploy.pruning.costs import SEQ_LEN, layer_parameters, pruning_costs
from cahp_deploy.pruning.rewrite import prune_model, validate_kept_heads, validate_kept_neurons
from cahp_deploy.selection.result import Selection

log = logging.getLogger(__name__)


def _read_selection(selection: str | os.PathLike | Selection) -> tuple[Selection, str]:
    """The selection and its hash (of the file's bytes, or of its canonical JSON when in memory)."""
    if isinstance(selection, Selection):
        return selection, sha256_json(selection.to_dict())
    sel = Selection.from_json(selection)
    return sel, sha256_file(selection)


def _check_selection_fits(sel: Selection, config, model: str, model_sha: str | None, source: str) -> list[list[int]]:
    n_layers, dense = arch.dense_head_grid(config)
    if sel.num_layers != n_layers:
        raise CahpError(
            f"{source} has {sel.num_layers} layers but {model} has {n_layers}; it was made for another model: run select on {model}"
        )
    if sel.heads_per_layer != dense:
        raise CahpError(
            f"{source} is for {sel.heads_per_layer} heads per layer but {model} has {dense}; it was made for another model: run select on {model}"
        )
    recorded = (sel.provenance or {}).get("model_sha256")
    if recorded and model_sha and recorded != model_sha:
        raise CahpError(
            f"{source} was made for a model with sha256 {recorded[:12]}..., but {model} has {model_sha[:12]}...; run select on {model}"
        )
    return validate_kept_heads(sel.kept_heads, n_layers, dense, source=source)


def _check_neurons_fit(sel: Selection, config, model: str, source: str) -> list[list[int]] | None:
    if sel.kept_neurons is None:
        return None
    inter = arch.intermediate_size(config)
    if sel.neurons_per_layer != inter:
        raise CahpError(f"{source} is for {sel.neurons_per_layer} FFN neurons per layer but {model} has {inter}; "
                        f"it was made for another model: run select on {model}")
    return validate_kept_neurons(sel.kept_neurons, arch.num_layers(config), inter, source=source)


def prune(model: str | os.PathLike, selection: str | os.PathLike | Selection, out: str | os.PathLike,
          force: bool = False) -> Path:
    """Prune ``model`` to the heads ``selection`` keeps and write a complete HF model dir to ``out``.

    Returns ``out``. Raises :class:`CahpError` (before writing anything) when ``out`` exists without
    ``force``, the selection is unreadable or made for another model (layer count, heads per layer,
    model hash in ``provenance.model_sha256``), or its indices are out of range, repeated, or keep
    no head at all.
    """
    out = check_output_path(out, force)
    model = str(model)
    sel, sel_sha = _read_selection(selection)
    source = str(selection) if not isinstance(selection, Selection) else "selection"
    config = load_config(model)
    if is_pruned(config):
        raise CahpError(f"{model} is already pruned (config.json has cahp_kept_heads); prune its dense source model")
    model_sha = sha256_dir(model) if Path(model).is_dir() else None
    kept = _check_selection_fits(sel, config, model, model_sha, source)
    neurons = _check_neurons_fit(sel, config, model, source)

    net, tokenizer = load_dense(model).float().eval(), load_tokenizer(model)
    params_before = count_parameters(net)
    layer_params = {"before": layer_parameters(net)}
    prune_model(net, kept, neurons)
    params_after = count_parameters(net)
    layer_params["after"] = layer_parameters(net)
    n_layers, dense = arch.dense_head_grid(config)
    inter = arch.intermediate_size(config)
    record = {
        "schema": schema.PRUNING,
        "kept_heads": kept,
        "heads_per_layer_kept": [len(k) for k in kept],
        "num_heads_kept": sum(len(k) for k in kept),
        "num_heads_total": n_layers * dense,
        "kept_neurons": neurons,
        "neurons_per_layer_kept": None if neurons is None else [len(k) for k in neurons],
        "num_neurons_kept": None if neurons is None else sum(len(k) for k in neurons),
        "num_neurons_total": n_layers * inter,
        **pruning_costs(net.config, kept, params_before, params_after, SEQ_LEN, kept_neurons=neurons,
                        layer_params=layer_params),
        "selection_sha256": sel_sha,
        "source_model": model,
        "source_model_sha256": model_sha,
    }
    with atomic_dir(out, force) as tmp:
        net.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        with open(tmp / "pruning.json", "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
    log.info("pruned %s: %d -> %d heads, %d -> %d parameters; wrote %s",
             model, n_layers * dense, record["num_heads_kept"], params_before, params_after, out)
    return out
