"""arch.TRANSFORMERS: what differs between transformers 4.x and 5.x, answered in one place.

The attention-probability hook point must fire on every version (5.x's eager attention calls a
functional dropout, so the model is routed through the probe attention) without changing a single
logit or map, and ``output_attentions`` must line up with the layers on both.
"""

from __future__ import annotations

import copy
from importlib import metadata

import pytest
import torch

from cahp_deploy import arch
from cahp_deploy.errors import CahpError
from cahp_deploy.pruning import prune_model
from conftest import ARCHS, build_tiny_model


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (2, 9), generator=g)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("name", ARCHS)
def test_probe_hooks_fire_and_change_nothing(name, batch):
    model = build_tiny_model(name)
    with torch.no_grad():
        ref = model(**batch, output_attentions=True)
    seen: dict[int, torch.Tensor] = {}
    modules = [arch.attention_probs_module(model, i) for i in range(3)]
    assert model.config._attn_implementation == arch.maps_attention()
    handles = [m.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, out)) for i, m in enumerate(modules)]
    try:
        with torch.no_grad():
            out = model(**batch, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(out.logits, ref.logits)
    assert sorted(seen) == [0, 1, 2]
    for i in range(3):
        assert torch.equal(seen[i], ref.attentions[i]) and seen[i].shape == (2, 4, 9, 9)


def test_probe_replacement_reaches_the_logits(batch):
    """Attribution replaces the maps in a hook: the replacement must be what multiplies V."""
    model = build_tiny_model("bert")
    module = arch.attention_probs_module(model, 1)
    handle = module.register_forward_hook(lambda mod, args, out: torch.zeros_like(out))
    try:
        with torch.no_grad():
            zeroed = model(**batch).logits
    finally:
        handle.remove()
    with torch.no_grad():
        assert not torch.allclose(zeroed, model(**batch).logits)


def test_attentions_per_layer_lines_up_with_zero_head_layers(batch):
    pruned = prune_model(copy.deepcopy(build_tiny_model("bert")), [[1, 2], [], [0]])
    with torch.no_grad():
        att = pruned(**batch, output_attentions=True).attentions
    maps = arch.attentions_per_layer(pruned, att, batch["attention_mask"])
    assert [tuple(m.shape) for m in maps] == [(2, 2, 9, 9), (2, 0, 9, 9), (2, 1, 9, 9)]
    with pytest.raises(CahpError, match="returned 1 attention maps for 3 layers"):
        arch.attentions_per_layer(pruned, att[:1], batch["attention_mask"])


def test_the_row_is_the_installed_major_and_others_are_refused(monkeypatch):
    major = int(metadata.version("transformers").split(".")[0])
    assert arch.transformers_row() is arch.TRANSFORMERS[major]
    assert arch.export_attention(build_tiny_model("electra").config) == "eager"  # no sdpa class on 4.x either
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "6.0.0" if name == "transformers" else real(name))
    arch.transformers_row.cache_clear()
    try:
        with pytest.raises(CahpError, match=r"transformers 6\.0\.0 is not supported; supported: 4\.x, 5\.x"):
            arch.transformers_row()
    finally:
        monkeypatch.undo()
        arch.transformers_row.cache_clear()
