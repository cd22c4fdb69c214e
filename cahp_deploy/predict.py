"""Run an exported artifact on text with nothing but ONNX Runtime and the ``tokenizers`` library.

This is the first thing a serving team runs, and the path their own service will take, so it must not
need torch or transformers (importing ``transformers.AutoTokenizer`` pulls torch in). It reads only files
in the artifact dir: ``manifest.json`` (which file is which variant, labels), ``config.json`` and
``tokenizer.json`` / ``tokenizer_config.json``. It feeds the graph exactly the inputs the graph
declares (DistilBERT has no ``token_type_ids``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cahp_deploy import onnx_runtime
from cahp_deploy.errors import CahpError
from cahp_deploy.shipped import with_choice

#: Variant tried first when none is asked for: the ORT-optimized fp32 graph, then the plain export.
DEFAULT_VARIANTS = ("optimized", "fp32")
#: Files of the plain export when an artifact has no manifest entry for it.
_PLAIN_FILE = "model.onnx"
# RoBERTa-style position ids start after the padding index, so fewer tokens fit than positions exist.
_POSITION_OFFSET_TYPES = ("roberta", "xlm-roberta", "camembert")
#: --provider choices (ONNX Runtime names in :data:`cahp_deploy.onnx_runtime.PROVIDERS`)
PROVIDER_CHOICES = ("cpu", "cuda")


@dataclass
class Prediction:
    text: str
    text_pair: str | None
    label: str
    label_id: int
    scores: dict[str, float]

    def to_dict(self) -> dict:
        d = {"text": self.text, "label": self.label, "label_id": self.label_id, "scores": self.scores}
        if self.text_pair is not None:
            d["text_pair"] = self.text_pair
        return d


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CahpError(f"{path} is not valid JSON ({e}); re-export the artifact") from None


def resolve_variant(artifact_dir: Path, variant: str | None) -> tuple[str, Path]:
    """(variant name, ONNX file) from the manifest; ``None`` picks the ``recommended`` variant (the one `run`
    verified against its accuracy budget: its ``confirm.json``, :mod:`cahp_deploy.shipped`), else the first
    of DEFAULT_VARIANTS present."""
    manifest_path = artifact_dir / "manifest.json"
    variants: dict[str, str] = {}
    recommended = None
    if manifest_path.is_file():
        manifest = with_choice(artifact_dir, _read_json(manifest_path))
        variants = {k: v["file"] for k, v in (manifest.get("variants") or {}).items() if "file" in v}
        recommended = manifest.get("recommended")
    elif (artifact_dir / _PLAIN_FILE).is_file():
        variants = {"fp32": _PLAIN_FILE}
    if not variants:
        raise CahpError(
            f"{artifact_dir} is not an artifact dir (no manifest.json or model.onnx); "
            "create one with `cahp-deploy export`"
        )
    if variant is None:
        variant = recommended if recommended in variants else \
            next((v for v in DEFAULT_VARIANTS if v in variants), next(iter(variants)))
    if variant not in variants:
        raise CahpError(
            f"variant {variant!r} is not in {artifact_dir}; available: {', '.join(variants)}"
        )
    path = artifact_dir / variants[variant]
    if not path.is_file():
        raise CahpError(f"{path} is missing from the artifact; re-export it")
    return variant, path


def _max_tokens(config: dict, tokenizer_config: dict) -> int:
    limit = int(config.get("max_position_embeddings") or 512)
    if config.get("model_type") in _POSITION_OFFSET_TYPES:
        limit -= int(config.get("pad_token_id") or 1) + 1
    declared = tokenizer_config.get("model_max_length")
    if isinstance(declared, (int, float)) and 0 < declared < 1e6:
        limit = min(limit, int(declared))
    return limit


def _manifest(artifact_dir: Path) -> dict:
    path = artifact_dir / "manifest.json"
    return _read_json(path) if path.is_file() else {}


def promise_warning(artifact_dir: Path) -> str | None:
    """The warning a user must see when the artifact's accuracy promise was not confirmed on unseen rows
    (the run's ``confirm.json``, or an older artifact's manifest)."""
    promise = with_choice(artifact_dir, _manifest(artifact_dir)).get("promise") or {}
    if promise.get("confirmed") is not False:
        return None
    conf = promise.get("confirmation") or {}
    bound = f" (upper bound of the drop {conf['upper']:+.2f} points on {conf.get('rows')} rows)" if conf else ""
    return (f"warning: {artifact_dir}'s promise of at most {promise.get('max_drop_points')} points lost was NOT "
            f"confirmed on rows no decision saw{bound}; no variant is recommended")


def load_tokenizer(artifact_dir: Path, max_length: int | None = None):
    """The artifact's fast tokenizer, set to truncate at the length the artifact serves (manifest
    ``max_length``, at most the model's limit; ``max_length`` overrides it) and pad each batch."""
    from tokenizers import Tokenizer

    path = artifact_dir / "tokenizer.json"
    if not path.is_file():
        raise CahpError(
            f"{artifact_dir} has no tokenizer.json; export from a model dir that has a fast tokenizer"
        )
    tok = Tokenizer.from_file(str(path))
    config = _read_json(artifact_dir / "config.json") if (artifact_dir / "config.json").is_file() else {}
    tconf_path = artifact_dir / "tokenizer_config.json"
    tconf = _read_json(tconf_path) if tconf_path.is_file() else {}
    limit = _max_tokens(config, tconf)
    if max_length is None:
        max_length = _manifest(artifact_dir).get("max_length")
    if max_length is not None:
        if max_length < 2:
            raise CahpError(f"--max-length {max_length} is too small; use at least 2")
        limit = min(limit, max_length)
    tok.enable_truncation(max_length=limit)
    pad_token = tconf.get("pad_token")
    if isinstance(pad_token, dict):
        pad_token = pad_token.get("content")
    pad_token = pad_token or "[PAD]"
    pad_id = tok.token_to_id(pad_token)
    if pad_id is None:
        pad_id = int(config.get("pad_token_id") or 0)
    tok.enable_padding(pad_id=pad_id, pad_token=pad_token)
    return tok


def _labels(artifact_dir: Path, num_outputs: int) -> dict[int, str]:
    for name in ("manifest.json", "config.json"):
        p = artifact_dir / name
        if p.is_file():
            id2label = _read_json(p).get("id2label")
            if id2label:
                return {int(k): str(v) for k, v in id2label.items()}
    return {i: f"LABEL_{i}" for i in range(num_outputs)}


def predict(
    artifact_dir: str | os.PathLike,
    texts: list[str],
    pairs: list[str] | None = None,
    *,
    variant: str | None = None,
    batch_size: int = 32,
    max_length: int | None = None,
    provider: str = "cpu",
    threads: int | None = None,
) -> list[Prediction]:
    """Label and class probabilities for each text (or text pair) with the artifact's ONNX graph."""
    artifact_dir = Path(artifact_dir)
    if not artifact_dir.is_dir():
        raise CahpError(f"artifact dir {artifact_dir} does not exist")
    if not texts:
        raise CahpError("nothing to predict: give a text argument or --file with at least one line")
    if pairs is not None and len(pairs) != len(texts):
        raise CahpError(f"{len(texts)} texts but {len(pairs)} text pairs; give one pair per text")
    if batch_size < 1:
        raise CahpError(f"--batch-size {batch_size} must be >= 1")
    _, path = resolve_variant(artifact_dir, variant)
    warning = promise_warning(artifact_dir)
    if warning:
        import sys

        print(warning, file=sys.stderr)
    tok = load_tokenizer(artifact_dir, max_length)
    onnx_runtime.check_provider(provider, PROVIDER_CHOICES)
    session = onnx_runtime.load_session(path, provider, threads=threads)
    inputs = onnx_runtime.input_dtypes(session)

    results: list[Prediction] = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        pchunk = None if pairs is None else pairs[start : start + batch_size]
        encs = tok.encode_batch(list(zip(chunk, pchunk)) if pchunk is not None else chunk)
        fields = {
            "input_ids": [e.ids for e in encs],
            "attention_mask": [e.attention_mask for e in encs],
            "token_type_ids": [e.type_ids for e in encs],
        }
        logits = onnx_runtime.logits(session, [onnx_runtime.feed(inputs, fields)]).astype(np.float64)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        names = _labels(artifact_dir, probs.shape[-1])
        for i, p in enumerate(probs):
            k = int(p.argmax())
            results.append(
                Prediction(
                    text=chunk[i],
                    text_pair=None if pchunk is None else pchunk[i],
                    label=names.get(k, str(k)),
                    label_id=k,
                    scores={names.get(j, str(j)): round(float(v), 6) for j, v in enumerate(p)},
                )
            )
    return results


def read_inputs(path: str | os.PathLike) -> tuple[list[str], list[str] | None]:
    """Texts (and pairs) from a JSONL file: objects with ``text`` (+ ``text_pair``, or
    ``premise``/``hypothesis``), or bare JSON strings, one per line."""
    path = Path(path)
    if not path.is_file():
        raise CahpError(f"input file {path} does not exist")
    texts: list[str] = []
    pairs: list[str | None] = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise CahpError(f"{path}:{n} is not JSON; write one JSON object per line") from None
            if isinstance(row, str):
                row = {"text": row}
            if not isinstance(row, dict):
                raise CahpError(f"{path}:{n}: expected an object with a 'text' field")
            if "premise" in row and "hypothesis" in row:
                texts.append(str(row["premise"]))
                pairs.append(str(row["hypothesis"]))
            elif "text" in row:
                texts.append(str(row["text"]))
                pairs.append(None if row.get("text_pair") is None else str(row["text_pair"]))
            else:
                raise CahpError(f"{path}:{n}: no 'text' field (fields: {', '.join(row)})")
    if any(p is not None for p in pairs):
        if any(p is None for p in pairs):
            raise CahpError(f"{path}: some lines have a text pair and some do not; give all or none")
        return texts, pairs  # type: ignore[return-value]
    return texts, None


__all__ = ["Prediction", "predict", "read_inputs", "resolve_variant", "load_tokenizer"]
