"""A/B of the signature pass's forward on minilm-sst5: full forward with output_attentions vs the
early stop after the last layer's attention maps (signatures.attention_maps_only).

Interleaved repetitions on the same pre-tokenized batches, CPU seconds, one torch thread: on a shared
2-core machine one-off wall times of whole runs moved by +-50% from run to run, so only an
interleaved comparison of the same work says what the change itself is worth.

Usage: python experiments/select_speed_ab.py [--rows 384] [--reps 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from cahp_deploy.data import iter_batches, load_labelled
from cahp_deploy.modeling import load_classifier
from cahp_deploy.signals import model_inputs
from cahp_deploy.signals.signatures import attention_maps_only, forward_until_attention

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=384)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    net, tok = load_classifier(SHARED / "models" / "minilm-sst5")
    data = load_labelled(SHARED / "data" / "sst5", "train").head(args.rows)
    batches = [model_inputs(net, enc) for _, enc, _ in iter_batches(tok, data, batch_size=64)]

    def full():
        with torch.inference_mode():
            for enc in batches:
                net(**enc, output_attentions=True)

    def early():
        with torch.inference_mode(), attention_maps_only(net) as maps:
            for enc in batches:
                forward_until_attention(net, enc, maps)

    seconds: dict[str, list[float]] = {"full": [], "early_stop": []}
    for _ in range(args.reps):
        for name, fn in (("full", full), ("early_stop", early)):
            c = time.process_time()
            fn()
            seconds[name].append(round(time.process_time() - c, 2))
    print(seconds)


if __name__ == "__main__":
    main()
