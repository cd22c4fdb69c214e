"""The refit stage: a pruned model dir, refit layer by layer against its dense model, into a new model dir.

The math is :func:`cahp_deploy.recovery.reconstruct.reconstruct` (least squares, no training, no
labels); this module loads the two models, samples the calibration rows, runs it and writes the
refit model (``refit.json`` beside it says what changed), atomically, so it reloads and exports like
any pruned model.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from cahp_deploy.atomic import check_output_path
from cahp_deploy.data import LabelledData
from cahp_deploy.hashing import sha256_dir

REFIT_FILE = "refit.json"
#: calibration rows (a seeded sample of the given split): Kwon et al. use 2,048
DEFAULT_REFIT_ROWS = 2000


def refit(
    pruned_dir: str | os.PathLike,
    dense_model: str | os.PathLike,
    rows: LabelledData,
    out: str | os.PathLike,
    *,
    max_length: int,
    max_examples: int | None = DEFAULT_REFIT_ROWS,
    seed: int = 0,
    force: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Refit ``pruned_dir`` against ``dense_model`` on a seeded sample of ``rows``; write ``out``.

    ``options`` go to :func:`~cahp_deploy.recovery.reconstruct.reconstruct` (ridge, target, ffn).
    Returns the record written to ``out/refit.json``.
    """
    from cahp_deploy.modeling import load_classifier
    from cahp_deploy.recovery.reconstruct import reconstruct
    from cahp_deploy.recovery.stage import sample_examples, save_model_dir

    pruned_dir, out = Path(pruned_dir), Path(out)
    check_output_path(out, force)
    start = time.perf_counter()
    calibration = sample_examples(rows, max_examples, seed)
    model, tokenizer = load_classifier(pruned_dir, attn_implementation=None)
    dense, _ = load_classifier(dense_model, attn_implementation=None, with_tokenizer=False)
    result = reconstruct(model, dense, tokenizer, calibration, max_length=max_length, seed=seed, **options)
    del dense
    record = {
        "source_model": str(pruned_dir.name),
        "source_model_sha256": sha256_dir(pruned_dir),
        "dense_model_sha256": sha256_dir(dense_model) if Path(dense_model).is_dir() else str(dense_model),
        "calibration": {**calibration.provenance(), "num_examples": len(calibration), "seed": seed},
        "max_length": int(max_length),
        "reconstruct": result,
        "total_seconds": time.perf_counter() - start,
    }
    save_model_dir(out, force, model, tokenizer, pruned_dir, REFIT_FILE, record)
    return record


__all__ = ["DEFAULT_REFIT_ROWS", "REFIT_FILE", "refit"]
