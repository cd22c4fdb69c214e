"""The artifacts a benchmark compares: verified, described, and checked to be comparable.

Everything here runs before the first timing, so a wrong path, a tampered file or a baseline for
another task fails in seconds, not after minutes of measurement.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cahp_deploy.bench.config import DEPLOYED, VARIANTS
from cahp_deploy.bench.inputs import max_sequence_length
from cahp_deploy.errors import CahpError
from cahp_deploy.hashing import sha256_file
from cahp_deploy.shipped import with_choice

#: every variant an export can hold, in report order

# Files that define the token ids; artifacts fed the same batches must agree on them.
_VOCAB_FILES = ("vocab.txt", "vocab.json", "merges.txt", "sentencepiece.bpe.model", "spiece.model", "tokenizer.json")


def _export_pkg():
    """The export stage's public API (imported late: it pulls in torch/optimum on first use)."""
    from cahp_deploy import export

    return export


@dataclass
class Artifact:
    name: str
    path: Path
    manifest: dict
    config: dict
    is_baseline: bool
    variants: dict[str, Path] = field(default_factory=dict)  # variant -> file, the ones to time

    @property
    def num_labels(self) -> int:
        return int(self.manifest.get("num_labels") or self.config.get("num_labels") or len(self.config.get("id2label") or {}) or 2)

    @property
    def flop_ceiling(self) -> float:
        """Dense/pruned MACs at seq 128 (pruning.json); 1.0 for a dense artifact."""
        pruning = self.manifest.get("pruning") or {}
        return float(pruning.get("flop_ceiling_speedup") or 1.0)

    @property
    def _position_config(self) -> dict:
        cfg = dict(self.config)
        if self.manifest.get("max_position_embeddings"):
            cfg["max_position_embeddings"] = self.manifest["max_position_embeddings"]
        return cfg

    @property
    def max_seq(self) -> int:
        return max_sequence_length(self._position_config)

    @property
    def serving_length(self) -> int:
        """The length the artifact serves (:func:`cahp_deploy.serving_length.of_manifest`)."""
        from cahp_deploy.serving_length import of_manifest

        return of_manifest(self.manifest, self._position_config)

    def file_of(self, variant: str) -> Path | None:
        """The file of ``variant`` if the artifact has it (timed or not)."""
        path = _export_pkg().variant_path(self.path, variant)
        return path if path.exists() else None

    def variants_present(self) -> list[str]:
        exp = _export_pkg()
        found = []
        for v in VARIANTS:
            if v in (self.manifest.get("variants") or {}) and exp.variant_path(self.path, v).exists():
                found.append(v)
        return found

    def describe(self) -> dict:
        m = self.manifest
        return {
            "name": self.name,
            "path": str(self.path),
            "baseline": self.is_baseline,
            "dense": m.get("kept_heads") is None,
            "model_type": m.get("model_type") or self.config.get("model_type"),
            "num_labels": self.num_labels,
            "num_heads_kept": m.get("num_heads_kept"),
            "num_heads_total": m.get("num_heads_total"),
            "kept_heads": m.get("kept_heads"),
            "recommended": with_choice(self.path, m).get("recommended"),
            "num_neurons_kept": m.get("num_neurons_kept"),
            "num_neurons_total": m.get("num_neurons_total"),
            "flop_ceiling_speedup": self.flop_ceiling,
            "source_model": m.get("source_model"),
            "source_model_sha256": m.get("source_model_sha256"),
            "selection_sha256": m.get("selection_sha256"),
            "max_sequence_length": self.max_seq,
        }


#: ONNX Runtime's fused attention operators (contrib domain); one per layer that kept a head
_FUSED_ATTENTION = ("Attention", "MultiHeadAttention", "QAttention", "PackedAttention", "PackedMultiHeadAttention")


def graph_facts(path: Path) -> dict:
    """Parameters (elements of floating-point initializers) and fused attention nodes of one file."""
    import numpy as np
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    return {
        "params": int(sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in floats)),
        "fused_attention_nodes": sum(1 for n in model.graph.node if n.op_type in _FUSED_ATTENTION),
    }


def attention_layers(a: Artifact) -> int:
    """Layers that still have attention heads: what an optimized graph should fuse."""
    kept = a.manifest.get("kept_heads")
    if kept is not None:
        return sum(1 for layer in kept if len(layer) > 0)
    from transformers import AutoConfig

    from cahp_deploy import arch

    return arch.num_layers(AutoConfig.from_pretrained(str(a.path)))


def _unique_name(path: Path, taken: set[str]) -> str:
    name = path.name or str(path)
    if name in taken:
        name = f"{path.parent.name}/{path.name}"
    base, i = name, 2
    while name in taken:
        name, i = f"{base}#{i}", i + 1
    taken.add(name)
    return name


def open_artifact(path: str | os.PathLike, is_baseline: bool, name: str, smoke: bool = True) -> Artifact:
    """Check ``path`` is an artifact dir, run the export's ``verify`` (hashes, smoke run), load it."""
    p = Path(path)
    role = "--baseline" if is_baseline else "artifact"
    if not p.is_dir():
        raise CahpError(f"{role} {p} does not exist or is not a directory; pass a dir written by `cahp-deploy export`")
    if not (p / "manifest.json").is_file():
        raise CahpError(f"{role} {p} is not an artifact dir (no manifest.json); make one with `cahp-deploy export`")
    exp = _export_pkg()
    exp.verify(p, smoke=smoke)  # CahpError on a tampered or incomplete artifact
    manifest = exp.load_manifest(p)
    try:
        config = json.loads((p / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CahpError(f"{role} {p} has no readable config.json ({e}); re-export it") from e
    return Artifact(name=name, path=p, manifest=manifest, config=config, is_baseline=is_baseline)


def open_all(artifacts: list[str | os.PathLike], baseline: str | os.PathLike, smoke: bool = True) -> list[Artifact]:
    """Baseline first, then every other artifact once (the baseline listed again is not repeated)."""
    if not artifacts:
        raise CahpError("no artifact to benchmark; pass one or more ARTIFACT_DIR")
    taken: set[str] = set()
    base_path = Path(baseline)
    out = [open_artifact(base_path, True, _unique_name(base_path, taken), smoke)]
    seen = {base_path.resolve()}
    for a in artifacts:
        p = Path(a)
        if p.resolve() in seen:
            continue
        seen.add(p.resolve())
        out.append(open_artifact(p, False, _unique_name(p, taken), smoke))
    return out


def _labels(a: Artifact) -> dict[str, str] | None:
    id2label = a.manifest.get("id2label") or a.config.get("id2label")
    return None if id2label is None else {str(k): str(v) for k, v in id2label.items()}


def _vocab_signature(a: Artifact) -> dict[str, str]:
    return {f: sha256_file(a.path / f) for f in _VOCAB_FILES if (a.path / f).is_file()}


def check_comparable(arts: list[Artifact]) -> None:
    """Every artifact must solve the baseline's task: same label count, label names, task, vocabulary."""
    base = arts[0]
    base_vocab = _vocab_signature(base)
    for a in arts[1:]:
        if a.num_labels != base.num_labels:
            raise CahpError(
                f"baseline {base.path} has {base.num_labels} labels but {a.path} has {a.num_labels} labels; "
                "the baseline must be the dense export of the same fine-tuned model"
            )
        t_base, t_a = base.manifest.get("task"), a.manifest.get("task")
        if t_base and t_a and t_base != t_a:
            raise CahpError(f"baseline {base.path} is for task {t_base!r} but {a.path} is for {t_a!r}; compare models of one task")
        if _labels(base) and _labels(a) and _labels(base) != _labels(a):
            raise CahpError(
                f"baseline {base.path} has labels {_labels(base)} but {a.path} has {_labels(a)}; "
                "the baseline must be the dense export of the same fine-tuned model"
            )
        vocab = _vocab_signature(a)
        shared = set(vocab) & set(base_vocab)
        if any(vocab[f] != base_vocab[f] for f in shared):
            raise CahpError(f"{a.path} uses another tokenizer vocabulary than baseline {base.path}; compare models of one tokenizer")


def choose_variants(arts: list[Artifact], variants: list[str] | None, provider: str) -> list[str]:
    """Fill each artifact's ``variants``; return notes on what was skipped and why.

    Without ``variants``, what a deployment chooses between: the optimized graph, INT8 and (off the CPU:
    ONNX Runtime has few fp16 CPU kernels, so it would time casts, not the model) fp16, where present;
    an artifact with none of them times its fp32 graph. The baseline always keeps fp32 so that
    "speedup vs dense fp32" exists for every cell.
    """
    notes = []
    if variants is not None:
        variants = list(dict.fromkeys(variants))
        if not variants:
            raise CahpError("empty --variant list; choose from " + ", ".join(VARIANTS))
        bad = [v for v in variants if v not in VARIANTS]
        if bad:
            raise CahpError(f"unknown variant {bad[0]!r}; choose from {', '.join(VARIANTS)}")
    for a in arts:
        present = a.variants_present()
        if "fp32" not in present and a.is_baseline:
            raise CahpError(f"baseline {a.path} has no fp32 model (model.onnx); re-export it")
        if variants is None:
            wanted = [v for v in present if v in DEPLOYED and not (v == "fp16" and provider == "cpu")]
            if a.is_baseline or not wanted:
                wanted = [v for v in VARIANTS if v in present and (v in wanted or v == "fp32")]
            if "fp16" in present and provider == "cpu":
                notes.append(f"{a.name}: fp16 not timed on the CPU provider (pass --variant fp16 to force it)")
        else:
            missing = [v for v in variants if v not in present]
            if missing and not a.is_baseline:
                raise CahpError(
                    f"{a.path} has no {missing[0]} variant (it has {', '.join(present)}); "
                    f"re-export it with that variant or drop --variant {missing[0]}"
                )
            for v in missing:
                notes.append(f"baseline {a.name} has no {v} variant: no same-variant speedup for {v}")
            wanted = [v for v in VARIANTS if v in present and (v in variants or (a.is_baseline and v == "fp32"))]
        if not wanted:
            raise CahpError(f"{a.path} has no variant to time (present: {', '.join(present) or 'none'})")
        a.variants = {v: _export_pkg().variant_path(a.path, v) for v in wanted}
    return notes


def check_seqs(arts: list[Artifact], seqs: tuple[int, ...]) -> None:
    for a in arts:
        too_long = [s for s in seqs if s > a.max_seq]
        if too_long:
            raise CahpError(
                f"--seq {too_long[0]} is longer than {a.path} allows ({a.max_seq} positions, max_position_embeddings); "
                f"use --seq values <= {a.max_seq}"
            )
