"""A/B of CAHP's evidence passes in fp32 vs bf16 autocast on minilm-sst5 (``select --precision``).

Interleaved repetitions on the same pre-tokenized batches, CPU seconds, one torch thread: the
signature forward (early stop after the last layer's maps) over 384 train rows, and the salience
forward + backward over two batches of 64; then the largest difference of an attention probability.

Usage: python experiments/select_bf16_ab.py
"""
import time, torch, sys
from pathlib import Path
from cahp_deploy.data import iter_batches, load_labelled
from cahp_deploy.modeling import load_classifier
from cahp_deploy.signals import model_inputs
from cahp_deploy.signals.signatures import attention_maps_only, forward_until_attention
torch.set_num_threads(1)
S = Path(__file__).resolve().parents[1].parent / "shared"
net, tok = load_classifier(S/"models"/"minilm-sst5")
data = load_labelled(S/"data"/"sst5", "train").head(384)
batches = [model_inputs(net, enc) for _, enc, _ in iter_batches(tok, data, batch_size=64)]
def run(bf16):
    outs=[]
    with torch.inference_mode(), attention_maps_only(net) as maps:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
        with ctx:
            for enc in batches:
                outs.append([a.float() for a in forward_until_attention(net, enc, maps)])
    return outs
def sal(bf16):
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
    for enc in batches[:2]:
        with ctx:
            out = net(**enc)
            loss = out.logits.float().logsumexp(-1).sum()
        loss.backward()
for rep in range(3):
    for bf in (False, True):
        t=time.process_time(); o=run(bf); a=time.process_time()-t
        t=time.process_time(); sal(bf); b=time.process_time()-t
        print(rep, "bf16" if bf else "fp32", f"sig {a:.2f}s  sal(2 batches) {b:.2f}s", flush=True)
o32, o16 = run(False), run(True)
d = max((x-y).abs().max().item() for bx,by in zip(o32,o16) for x,y in zip(bx,by))
print("max |attn diff|", d)
