"""Why `--model asym --lora 8` did not train: count alone, plain AdamW at lr 1e-2.

    python lora_vocab_diag.py                          # -> lora_vocab_diag.log (60 steps, with and without ak.attach)
    python lora_vocab_diag.py --vocab --steps 150 --no-attach   # -> lora_vocab_diag_trainable.log
``--vocab`` also trains lm_head and embed_tokens (what ``--lora-vocab`` does).
"""
import argparse

import torch

import aim_kernels as ak
from aim_kernels.continual import data
from aim_kernels.continual.model import inputs, make_model, model_spec
from aim_kernels.continual.train import evaluate

p = argparse.ArgumentParser()
p.add_argument("--vocab", action="store_true")
p.add_argument("--steps", type=int, default=60)
p.add_argument("--no-attach", action="store_true", help="only the plain loop, not also with ak.attach")
args = p.parse_args()
torch.set_num_threads(1)
bench = data.make_benchmark(0)
every = max(args.steps // 3, 1)
for attach in (False,) if args.no_attach else (False, True):
    model, _ = make_model(model_spec("asym", 8), 0)
    if args.vocab:
        for n, prm in model.named_parameters():
            if "lm_head" in n or "embed_tokens" in n:
                prm.requires_grad_(True)
    tr = [(n, prm.numel()) for n, prm in model.named_parameters() if prm.requires_grad]
    print("trainable tensors", len(tr), "elements", sum(k for _, k in tr), tr[:3])
    if attach:
        ak.attach(model, ak.preset("naive"))
    params = [prm for prm in model.parameters() if prm.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    s = bench.train["count"]
    g = torch.Generator().manual_seed(0)
    before = {n: prm.detach().clone() for n, prm in model.named_parameters() if prm.requires_grad}
    for step in range(args.steps):
        idx = torch.randint(0, len(s), (32,), generator=g)
        pix, ids = inputs(model, s.images[idx], s.questions[idx])
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids, pixel_values=pix).logits[:, -1],
                                                 s.answers[idx])
        opt.zero_grad()
        loss.backward()
        if step == 0:
            gn = {n: (prm.grad.norm().item() if prm.grad is not None else None)
                  for n, prm in model.named_parameters() if prm.requires_grad}
            print("grad norms (first 4):", list(gn.items())[:4], "none:", sum(v is None for v in gn.values()))
        if attach:
            ak.masked_step(model)
        opt.step()
        if step % every == 0:
            print(attach, step, round(loss.item(), 3))
    moved = sum((prm.detach() - before[n]).norm().item() for n, prm in model.named_parameters() if prm.requires_grad)
    print("attach", attach, "count acc", evaluate(model, bench.test["count"]), "moved", moved)
