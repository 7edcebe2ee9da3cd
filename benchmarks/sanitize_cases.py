"""Small cases of every op on one backend, checked against the reference: what
``gpu_check.py`` runs under compute-sanitizer (memcheck, racecheck) on the ``cuda``
backend. Shapes cross every kernel path: empty and one-element groups, group ends inside
a tile, misaligned views (scalar path), fp32 / bf16 / fp16 storage, a group larger than
one tile, k = 0 and k = n.

    python benchmarks/sanitize_cases.py [--device cuda|cpu] [--quick]
"""
from __future__ import annotations

import argparse
import sys

import torch

from aim_kernels import ops
from aim_kernels.ops import reference


def cases(quick: bool):
    for dtype in (torch.float32,) if quick else (torch.float32, torch.bfloat16, torch.float16):
        for sizes in ((0, 1, 5000, 3, 0, 20000), (9000,), (1, 1, 1)):
            for shift in (0, 1):
                yield dtype, sizes, shift


def _tensor(n, dtype, dev, shift, gen, kind="randn"):
    buf = (torch.randn if kind == "randn" else torch.rand)(n + shift, generator=gen)
    return buf.to(dtype).to(dev)[shift:]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="fp32 only (the dry run)")
    args = ap.parse_args(argv)
    dev = args.device
    backend = dev if dev in ("cuda", "cpu") else "torch"
    gen = torch.Generator().manual_seed(0)
    bad = 0
    for dtype, sizes, shift in cases(args.quick):
        n = sum(sizes)
        cuts = torch.tensor([0] + list(torch.tensor(sizes).cumsum(0).tolist()), dtype=torch.int64)
        offsets = cuts.to(dev)
        G = len(sizes)
        grad, param, anchor = (_tensor(n, dtype, dev, shift, gen) for _ in range(3))
        imp, fisher = (_tensor(n, torch.float32, dev, shift, gen, "rand") for _ in range(2))
        per = [torch.rand(G, generator=gen).to(dev) for _ in range(4)]
        ref = [x.cpu().clone() for x in (grad, param, anchor, imp, fisher)]
        stats = ops.fused_step(grad, param, anchor, imp, fisher, offsets, *per, beta=0.9,
                               backend=backend)
        ref_stats = reference.fused_step(*ref, cuts, *[p.cpu() for p in per], beta=0.9)
        ok = torch.allclose(grad.cpu().float(), ref[0].float(), rtol=1e-2, atol=1e-3) and \
            torch.allclose(stats.cpu(), ref_stats, rtol=1e-3, atol=1e-3)
        ratio = torch.full((G,), 0.3, dtype=torch.float64)
        ratio[0], ratio[-1] = (0.0, 0.999) if G > 1 else (0.3, 0.3)     # k = 0, k ~ n
        ratio = ratio.to(dev)
        c, t = ops.group_thresholds(imp, offsets, ratio, backend=backend)
        c_ref, t_ref = reference.group_thresholds(imp.cpu(), cuts, ratio.cpu())
        ok &= torch.equal(t.cpu(), t_ref)
        m_g = ops.align_thresholds(anchor, offsets, 0.5, backend=backend)
        p2 = param.clone()
        ops.align_apply_(p2, anchor, offsets, m_g, backend=backend)
        p3 = param.cpu().clone()
        reference.align_(p3, anchor.cpu(), cuts, 0.5)
        ok &= torch.equal(p2.cpu(), p3)
        ops.align_(param, anchor, offsets, 0.5, mode="zero", backend=backend)
        ops.consolidate_(param, anchor, imp, fisher, fisher_scale=2.0, decay=0.9,
                         merge="fisher", alpha=0.5, backend=backend)
        if dev == "cuda":
            torch.cuda.synchronize()
        if not ok:
            bad += 1
            print(f"MISMATCH: {dtype} sizes={sizes} shift={shift}")
    print(f"sanitize_cases on {dev}: {bad} mismatches")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
