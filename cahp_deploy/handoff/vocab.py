"""Vocabulary trimming for edge size (as TextPruner's ``VocabularyPruner``): keep only the tokens a
corpus uses, in the ONNX graph and in the tokenizer, consistently.

Why rewrite the ONNX initializer and not re-export: the artifact dir is what was verified, and the
handoff must not depend on the PyTorch model dir (a serving team may only have the artifact). The
word-embedding matrix is the one 2-D initializer with ``vocab_size`` rows; dropping rows and
renumbering the tokenizer the same way (old ids sorted -> new ids 0..k-1) leaves every other weight
untouched, so on texts whose tokens are all kept the logits are bit-for-bit those of the source.

Why greedy WordPiece stays exact on covered words: it takes the longest vocabulary match at each
position; a subset vocabulary that still holds the original pieces still yields them (any longer
match would have been in the full vocabulary too). Words with a dropped piece become ``[UNK]``.
Only WordPiece (BERT, MiniLM, DistilBERT, ELECTRA) is supported; BPE/Unigram merges reference
tokens by string and need a different rewrite.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np

from cahp_deploy.errors import CahpError

log = logging.getLogger(__name__)

#: tokenizer files a trimmed tokenizer dir is made of (copied from the artifact, then rewritten)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def load_fast_tokenizer(directory: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(directory))
    if not getattr(tok, "is_fast", False):
        raise CahpError(f"{directory}: vocabulary trimming needs a fast tokenizer (tokenizer.json); none found")
    return tok


def check_wordpiece(tokenizer_json: dict, where: str) -> None:
    kind = tokenizer_json.get("model", {}).get("type")
    if kind != "WordPiece":
        raise CahpError(
            f"{where}: --trim-vocab supports WordPiece tokenizers (BERT, MiniLM, DistilBERT, ELECTRA); this one is "
            f"{kind!r}. Drop --trim-vocab for this model"
        )


def token_ids(tokenizer, texts: list[str], pairs: list[str] | None = None) -> list[list[int]]:
    """Token ids of each text (special tokens included, no truncation: trimming must keep every id used)."""
    enc = tokenizer(texts, pairs, add_special_tokens=True, truncation=False)
    return enc["input_ids"]


def kept_ids(tokenizer, texts: list[str], pairs: list[str] | None = None) -> np.ndarray:
    """Sorted old ids to keep: every id ``texts`` use, plus every special and added token."""
    used = {i for ids in token_ids(tokenizer, texts, pairs) for i in ids}
    used |= set(int(i) for i in tokenizer.all_special_ids)
    used |= set(int(i) for i in tokenizer.get_added_vocab().values())
    return np.asarray(sorted(used), dtype=np.int64)


def _remap_post_processor(pp: dict | None, old2new: dict[int, int]) -> dict | None:
    if pp is None:
        return None
    pp = copy.deepcopy(pp)
    kind = pp.get("type")
    if kind == "TemplateProcessing":
        for spec in pp.get("special_tokens", {}).values():
            spec["ids"] = [old2new[int(i)] for i in spec["ids"]]
    elif kind in ("BertProcessing", "RobertaProcessing"):
        for key in ("sep", "cls"):
            tok, i = pp[key]
            pp[key] = [tok, old2new[int(i)]]
    elif kind == "Sequence":
        pp["processors"] = [_remap_post_processor(p, old2new) for p in pp.get("processors", [])]
    elif kind is not None:
        raise CahpError(f"--trim-vocab: unknown tokenizer post-processor {kind!r}; cannot renumber its special tokens")
    return pp


def trim_tokenizer_json(tok: dict, keep: np.ndarray) -> dict:
    """``tokenizer.json`` with only ``keep`` (sorted old ids), renumbered 0..len(keep)-1."""
    check_wordpiece(tok, "tokenizer.json")
    old2new = {int(o): n for n, o in enumerate(keep)}
    out = copy.deepcopy(tok)
    vocab = out["model"]["vocab"]
    out["model"]["vocab"] = {t: old2new[i] for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i in old2new}
    if out["model"].get("unk_token") not in out["model"]["vocab"]:
        raise CahpError("--trim-vocab: the unknown token is not in the kept vocabulary (is it a special token?)")
    added = []
    for a in out.get("added_tokens", []):
        if a["id"] not in old2new:
            raise CahpError(f"--trim-vocab: added token {a['content']!r} (id {a['id']}) was not kept")
        added.append({**a, "id": old2new[a["id"]]})
    out["added_tokens"] = added
    out["post_processor"] = _remap_post_processor(out.get("post_processor"), old2new)
    if out.get("padding") and "pad_id" in out["padding"]:
        out["padding"] = {**out["padding"], "pad_id": old2new[int(out["padding"]["pad_id"])]}
    return out


def trim_tokenizer_dir(src: Path, dst: Path, keep: np.ndarray) -> None:
    """Write the trimmed ``tokenizer.json``, ``vocab.txt`` and ``tokenizer_config.json`` into ``dst``."""
    old2new = {int(o): n for n, o in enumerate(keep)}
    tok = json.loads((src / "tokenizer.json").read_text())
    new = trim_tokenizer_json(tok, keep)
    (dst / "tokenizer.json").write_text(json.dumps(new, ensure_ascii=False, indent=2) + "\n")
    vocab = sorted(new["model"]["vocab"].items(), key=lambda kv: kv[1])
    (dst / "vocab.txt").write_text("".join(f"{t}\n" for t, _ in vocab))
    cfg_path = src / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        if "added_tokens_decoder" in cfg:
            cfg["added_tokens_decoder"] = {str(old2new[int(k)]): v for k, v in cfg["added_tokens_decoder"].items()}
        (dst / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n")
    sp = src / "special_tokens_map.json"
    if sp.is_file():
        (dst / "special_tokens_map.json").write_text(sp.read_text())


def trim_model_config(config: dict, keep: np.ndarray) -> dict:
    """config.json with the new ``vocab_size`` and special-token ids renumbered."""
    old2new = {int(o): n for n, o in enumerate(keep)}
    out = dict(config, vocab_size=int(len(keep)))
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id"):
        if out.get(key) is not None and int(out[key]) in old2new:
            out[key] = old2new[int(out[key])]
    return out


def embedding_initializer(model, vocab_size: int):
    """The word-embedding initializer: the one 2-D initializer with ``vocab_size`` rows."""
    found = [t for t in model.graph.initializer if len(t.dims) == 2 and t.dims[0] == vocab_size]
    if len(found) != 1:
        raise CahpError(
            f"--trim-vocab: expected one 2-D initializer with {vocab_size} rows (the word embeddings) in the graph, "
            f"found {len(found)} ({', '.join(t.name for t in found) or 'none'}); cannot trim this graph"
        )
    return found[0]


def trim_onnx(src: Path, dst: Path, vocab_size: int, keep: np.ndarray) -> dict:
    """Copy ONNX ``src`` to ``dst`` keeping only rows ``keep`` of its word embeddings."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    init = embedding_initializer(model, vocab_size)
    weights = numpy_helper.to_array(init)
    new = numpy_helper.from_array(np.ascontiguousarray(weights[keep]), init.name)
    init.CopyFrom(new)
    onnx.save(model, str(dst))
    return {"initializer": init.name, "rows_before": int(weights.shape[0]), "rows_after": int(len(keep)),
            "hidden": int(weights.shape[1])}


def unk_stats(tokenizer, texts: list[str], pairs: list[str] | None = None) -> dict:
    """Share of tokens (special tokens excluded) that are the unknown token, and rows with any."""
    special = set(int(i) for i in tokenizer.all_special_ids) - {int(tokenizer.unk_token_id)}
    unk = int(tokenizer.unk_token_id)
    total = n_unk = rows = 0
    for ids in token_ids(tokenizer, texts, pairs):
        body = [i for i in ids if i not in special]
        k = sum(1 for i in body if i == unk)
        total += len(body)
        n_unk += k
        rows += k > 0
    return {"tokens": total, "unk_tokens": n_unk, "unk_rate": n_unk / max(total, 1), "rows_with_unk": rows,
            "rows": len(texts)}


def coverage(tokenizer, keep: np.ndarray, texts: list[str], pairs: list[str] | None = None) -> tuple[np.ndarray, dict]:
    """(covered, stats) under the *original* tokenizer.

    ``covered``: bool per row, every token of the row is kept (so the trimmed tokenizer gives the same
    pieces and the model the same logits). ``stats["dropped_rate"]``: share of tokens (special tokens
    excluded) whose id was dropped: what TextPruner-style trimming would turn into [UNK]. The trimmed
    WordPiece tokenizer re-splits most such words into kept pieces instead, so its actual [UNK] share
    (:func:`unk_stats`) is lower; both are reported.
    """
    kept = set(int(i) for i in keep)
    special = set(int(i) for i in tokenizer.all_special_ids)
    covered, total, dropped = [], 0, 0
    for ids in token_ids(tokenizer, texts, pairs):
        body = [i for i in ids if i not in special]
        k = sum(1 for i in body if i not in kept)
        total += len(body)
        dropped += k
        covered.append(k == 0 and all(i in kept for i in ids))
    return np.asarray(covered, dtype=bool), {"tokens": total, "dropped_tokens": dropped,
                                             "dropped_rate": dropped / max(total, 1)}
