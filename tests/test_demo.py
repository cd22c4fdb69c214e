"""The packaged demo set and the demo fine-tune: present, balanced, reproducible, usable offline."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest

from cahp_deploy.data import load_labelled
from cahp_deploy.demo import data_dir, make_data


def _rows(split: str) -> list[dict]:
    with open(data_dir() / f"{split}.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("split", list(make_data.SPLITS))
def test_split_is_balanced_binary_and_sized(split):
    d = load_labelled(data_dir(), split)
    assert len(d) == make_data.SPLITS[split]
    assert set(d.labels.tolist()) == {0, 1}
    assert np.bincount(d.labels).tolist() == [len(d) // 2, len(d) // 2]
    assert all(3 <= len(t.split()) <= 20 for t in d.texts)


def test_no_sentence_repeats_within_or_across_splits():
    texts = [r["text"] for split in make_data.SPLITS for r in _rows(split)]
    assert len(texts) == len(set(texts)) == sum(make_data.SPLITS.values())


def test_committed_files_are_what_the_generator_writes(tmp_path):
    """The files are generated, not edited by hand: regenerating gives the same bytes."""
    make_data.write(tmp_path)
    for split in make_data.SPLITS:
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (data_dir() / f"{split}.jsonl").read_bytes()
    make_data.write(tmp_path, seed=make_data.SEED + 1)
    assert (tmp_path / "train.jsonl").read_bytes() != (data_dir() / "train.jsonl").read_bytes()


def test_labels_follow_the_templates():
    """Negations and contrasts carry the label of the polarity that wins, not of the first word."""
    rows = {r["text"]: r["label"] for split in make_data.SPLITS for r in _rows(split)}
    negated = [(t, y) for t, y in rows.items() if " not " in t and "recommend" not in t]
    assert negated, "the set must contain negations"
    for text, label in negated:
        words = set(text.lower().rstrip(".").replace(",", "").split())
        flipped = 1 - label  # "not boring" is positive: the negated word has the other polarity
        assert words & set(make_data.POSITIVE if flipped == 1 else make_data.NEGATIVE), text


def test_demo_data_ships_as_package_data():
    root = resources.files("cahp_deploy.demo")
    for split in make_data.SPLITS:
        assert root.joinpath(f"{split}.jsonl").is_file()


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    """A tiny random *BertModel* (no head), like the packaged encoder but small."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from conftest import tokenizer_dir

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64,
                     max_position_embeddings=64)
    path = tmp_path_factory.mktemp("encoder")
    BertModel(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def small_demo_data(tmp_path_factory):
    """The first rows of the packaged splits, so a test fine-tune takes seconds."""
    path = tmp_path_factory.mktemp("demo_small")
    for split, n in (("train", 96), ("validation", 32)):
        lines = (data_dir() / f"{split}.jsonl").read_text().splitlines()[:n]
        (path / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return path


def test_finetune_turns_an_encoder_into_a_labelled_classifier(tiny_encoder, small_demo_data, tmp_path):
    from safetensors.numpy import load_file

    from cahp_deploy.demo.finetune import finetune
    from cahp_deploy.modeling import load_config

    out = finetune(tmp_path / "clf", data=small_demo_data, base_model=tiny_encoder, epochs=3,
                   learning_rate=1e-3, seed=0)
    config = load_config(out)  # a supported sequence classifier, or this raises
    assert config.architectures == ["BertForSequenceClassification"]
    assert config.num_labels == 2
    info = json.loads((out / "training_info.json").read_text())
    assert info["epochs"] == 3 and info["seed"] == 0 and info["num_train_examples"] == 96
    assert info["epoch_losses"][-1] < info["epoch_losses"][0]  # it learned something
    before = load_file(tiny_encoder / "model.safetensors")
    after = load_file(out / "model.safetensors")
    key = next(k for k in after if k.endswith("encoder.layer.0.attention.self.query.weight"))
    assert not np.allclose(after[key], before[key.removeprefix("bert.")])  # the encoder was tuned too
    assert (out / "tokenizer.json").is_file()


def test_packaged_set_gets_sentiment_label_names():
    from cahp_deploy.demo.finetune import _label_names

    assert _label_names(str(data_dir()), 2) == {0: "negative", 1: "positive"}


def test_finetune_refuses_an_existing_output(tiny_encoder, tmp_path):
    from cahp_deploy.demo.finetune import finetune
    from cahp_deploy.errors import CahpError

    (tmp_path / "clf").mkdir()
    with pytest.raises(CahpError, match="already exists"):
        finetune(tmp_path / "clf", base_model=tiny_encoder, epochs=1)
