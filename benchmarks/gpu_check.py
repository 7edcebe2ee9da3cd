"""``make gpu-check``: the first run on a GPU machine, as one command, into one JSON.

    python3 benchmarks/gpu_check.py          # on an H100/H200: < 8 min, full sizes
    python   benchmarks/gpu_check.py --dry    # here, on the CPU: small sizes, < 2 min

Writes ``benchmarks/results/gpu-check[-dry]-<device>-<date>.json`` (or ``--out``) with the same
fields in both modes (so ``make test``, which runs the dry mode, keeps the script alive):

* ``env``: device, driver, versions, commit, command, what ``_C`` was built with;
* ``info``: the output of ``python -m aim_kernels``;
* ``tests``: ``pytest -m cuda`` and the Triton tests (outcome counts; on a CPU they skip);
* ``sanitizer``: compute-sanitizer memcheck and racecheck over small cases of the ops on
  the ``cuda`` backend (``benchmarks/sanitize_cases.py``), where the tool exists;
* ``fused_step``: N = 2^26 and 2^28, fp32 and bf16 params (fp32 state), on cuda, triton,
  torch eager and torch.compile: median time, GB/s and the fraction of a same-size copy;
  torch's fused AdamW on the same N beside it (the step a user already pays for);
* ``group_thresholds``: N = 2^28 with one dominant group and with G = 1000;
* ``masked_step``: its share of a ~1B-parameter LLaVA-shaped bf16 train step (random
  weights, from a config) -- forward, backward, masked_step, fused AdamW.

Every section records its own failure (``{"error": ...}``) and the run goes on, so one
broken piece never costs the rest of a short GPU lease. The figures are taken first; the
test and sanitizer runs then share what is left of ``--budget`` (450 s), each cut at its
share, so the check ends in time whatever they take. Before importing the library on
a GPU machine, ``ensure_native`` builds ``_C`` in place for the local GPU when no build
of it is importable (the image has nvcc, CMake, ninja and pybind11).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIELDS = ("env", "info", "tests", "sanitizer", "fused_step", "adamw", "group_thresholds",
          "masked_step", "seconds")


def _run(cmd, timeout, env=None) -> dict:
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                             env=env)
        out = {"rc": res.returncode, "tail": (res.stdout + res.stderr)[-3000:]}
    except subprocess.TimeoutExpired as exc:
        out = {"rc": None, "error": f"timed out after {timeout} s",
               "tail": str(exc.stdout or "")[-3000:]}
    except OSError as exc:
        out = {"rc": None, "error": str(exc)}
    out["seconds"] = round(time.perf_counter() - t0, 2)
    out["command"] = " ".join(shlex.quote(str(c)) for c in cmd)
    return out


def _wheel_for_this_python() -> Path | None:
    """A CUDA wheel in dist/ (``make wheel CUDA=12.4``, carried over) for this interpreter."""
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    found = sorted((ROOT / "dist").glob(f"aim_kernels-*+cu*-{tag}-{tag}-*.whl"))
    return found[-1] if found else None


def ensure_native(dry: bool) -> dict:
    """On a GPU machine without an importable CUDA build of ``_C``: take ``_C`` (and the
    libraries auditwheel vendored beside it) from a carried wheel for this Python into the
    tree, else build it in place for the local GPU's architecture (~1 min on 16 cores)."""
    probe = ("import aim_kernels.ops.native as n, sys; i = n.built_info(); "
             "sys.exit(0 if i.get('built') and i.get('cuda') else 3)")
    ok = lambda: subprocess.run([sys.executable, "-c", probe], cwd=ROOT).returncode == 0  # noqa: E731
    if dry or ok():
        return {"built_here": False}
    wheel = _wheel_for_this_python()
    if wheel is not None:
        import zipfile
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                if name.startswith(("aim_kernels/_C", "aim_kernels.libs/")):
                    zf.extract(name, ROOT)
        if ok():
            return {"built_here": False, "wheel": wheel.name}
    import torch
    major, minor = torch.cuda.get_device_capability(0) if torch.cuda.is_available() else (9, 0)
    env = dict(os.environ, AIM_CUDA_ARCHS=f"{major}{minor}", AIM_REQUIRE_NATIVE="1")
    out = _run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], 900, env=env)
    out["built_here"] = True
    return out


# --------------------------------------------------------------------------- timing

def _sync(torch):
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(torch, fn, reps: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` (device events on a GPU, the host clock on a CPU)."""
    for _ in range(warmup):
        fn()
    _sync(torch)
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _share(args, runs_left: int) -> float:
    """Seconds for the next of ``runs_left`` subprocess runs: an even share of what is
    left before the deadline (at least 30, so each at least starts)."""
    return max(30.0, (args.deadline - time.perf_counter()) / max(1, runs_left))


def _guard(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as exc:   # noqa: BLE001 - one section's failure is a result, not an end
        return {"error": f"{type(exc).__name__}: {exc}"[:2000]}


# --------------------------------------------------------------------------- sections

def env_section(args) -> dict:
    import torch
    from aim_kernels.ops import native
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    smi = shutil.which("nvidia-smi")
    driver = None
    if smi:
        q = _run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], 30)
        driver = q.get("tail", "").strip().splitlines()[0] if q.get("rc") == 0 else None
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip() or os.environ.get("AIM_COMMIT", "unknown")
    cuda = torch.cuda.is_available()
    return {
        "mode": "dry" if args.dry else "gpu",
        "device": torch.cuda.get_device_name(0) if cuda else (platform.processor() or
                                                              platform.machine()),
        "sm_count": torch.cuda.get_device_properties(0).multi_processor_count if cuda else None,
        "driver": driver,
        "python": platform.python_version(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "triton": triton_version,
        "aim_kernels_C": native.built_info(),
        "commit": commit,
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def tests_section(args) -> dict:
    py = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if args.dry:    # the machinery only, on the cheapest file to collect (nothing runs GPU code)
        cuda = py + ["-m", "cuda", "tests/test_cuda_build.py"]
        trit = py + ["tests/test_cuda_build.py", "-k", "flags"]
    else:
        cuda = py + ["-m", "cuda", "tests"]
        trit = py + ["tests/test_backends.py", "tests/test_triton.py", "-k", "triton"]
    out = {}
    for name, cmd in (("pytest_cuda", cuda), ("pytest_triton", trit)):
        res = _run(cmd, 120 if args.dry else _share(args, 4 - len(out)))
        counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|"
                                                   r"deselected)", res.get("tail", ""))}
        out[name] = {**counts, "rc": res["rc"], "seconds": res["seconds"],
                     "command": res["command"],
                     **({"tail": res["tail"]} if res["rc"] not in (0, 5) else {})}
    return out


def sanitizer_section(args) -> dict:
    tool = shutil.which("compute-sanitizer")
    cases = [sys.executable, str(ROOT / "benchmarks" / "sanitize_cases.py")]
    import torch
    if tool is None or not torch.cuda.is_available():
        why = "no compute-sanitizer" if tool is None else "no CUDA device"
        ran = _run(cases + ["--device", "cpu", "--quick"], 120)   # the cases still run
        return {"memcheck": {"skipped": why}, "racecheck": {"skipped": why},
                "cases_on_cpu": {"rc": ran["rc"], "seconds": ran["seconds"]}}
    out = {}
    for check in ("memcheck", "racecheck"):
        res = _run([tool, "--tool", check, "--error-exitcode", "99", *cases],
                   _share(args, 2 - len(out)))
        m = re.search(r"ERROR SUMMARY: (\d+) error", res.get("tail", ""))
        out[check] = {"rc": res["rc"], "errors": int(m.group(1)) if m else None,
                      "seconds": res["seconds"], "tail": res.get("tail", "")[-1500:]}
    return out


def _backends(torch, dev):
    from aim_kernels import ops
    from aim_kernels.ops import reference
    names = {"cuda": "cuda", "triton": "triton", "torch": "torch"} if dev == "cuda" else {
        "cpu": "cpu", "triton": "triton", "torch": "torch"}     # (triton: the interpreter)
    out = {}
    for label, backend in names.items():
        why = ops.unavailable_reason(backend)
        out[label] = (None, why) if why else (backend, "")
    compiled = _guard(lambda: torch.compile(reference.fused_step, dynamic=True))
    out["torch.compile"] = (compiled, "") if callable(compiled) else (None, str(compiled))
    return out


def _step_tensors(torch, n, dtype, dev, groups=3):
    g = torch.Generator(device=dev).manual_seed(0)
    t = [torch.randn(n, device=dev, generator=g).to(dtype) * 1e-2 for _ in range(3)]
    s = [torch.rand(n, device=dev, generator=g) for _ in range(2)]
    cuts = [0, n * 97 // 100, n * 99 // 100, n][:groups + 1]
    offsets = torch.tensor(cuts, dtype=torch.int64, device=dev)
    per = [torch.full((groups,), v, device=dev) for v in (1.0, 0.9, 0.0, 1.0)]
    return t, s, offsets, per


def fused_step_section(args) -> dict:
    import torch
    from aim_kernels import ops
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = (1 << 14, 1 << 16) if args.dry else (1 << 26, 1 << 28)
    reps = 3 if args.dry else 10
    rows = []
    backends = _backends(torch, dev)
    for n in sizes:
        for dtype in (torch.float32, torch.bfloat16):
            (grad, param, anchor), (imp, fisher), offsets, per = _step_tensors(torch, n, dtype, dev)
            nbytes = n * (4 * grad.element_size() + 3 * imp.element_size())
            half = torch.empty(nbytes // 2, dtype=torch.uint8, device=dev)
            dst = torch.empty_like(half)
            t_copy = timed(torch, lambda: dst.copy_(half), reps)
            copy_gbs = nbytes / t_copy / 1e9
            for label, (impl, why) in backends.items():
                row = {"n": n, "dtype": str(dtype).removeprefix("torch."), "backend": label,
                       "bytes": nbytes, "copy_gbs": round(copy_gbs, 2)}
                if impl is None:
                    rows.append({**row, "skipped": why})
                    continue
                if label == "triton" and args.dry and n > sizes[0]:
                    rows.append({**row, "skipped": "interpreter: smallest size only"})
                    continue
                kw = dict(beta=0.99)
                if callable(impl):
                    call = lambda: impl(grad, param, anchor, imp, fisher, offsets, *per, **kw)  # noqa: E731
                else:
                    call = lambda: ops.fused_step(grad, param, anchor, imp, fisher, offsets,  # noqa: E731
                                                  *per, backend=impl, **kw)
                interpreted = label == "triton" and args.dry     # ~5 s a call on a CPU
                res = _guard(timed, torch, call, 1 if interpreted else reps,
                             0 if interpreted else 1)
                if isinstance(res, dict):
                    rows.append({**row, **res})
                    continue
                gbs = nbytes / res / 1e9
                rows.append({**row, "seconds": res, "gbs": round(gbs, 2),
                             "fraction_of_copy": round(gbs / copy_gbs, 3)})
            del grad, param, anchor, imp, fisher, half, dst
    return {"rows": rows}


def adamw_section(args) -> dict:
    import torch
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = (1 << 14, 1 << 16) if args.dry else (1 << 26, 1 << 28)
    rows = []
    for n in sizes:
        p = torch.nn.Parameter(torch.randn(n, device=dev) * 1e-2)
        p.grad = torch.randn(n, device=dev) * 1e-3
        opt = torch.optim.AdamW([p], lr=1e-4, fused=True)
        res = _guard(timed, torch, opt.step, 3 if args.dry else 10)
        nbytes = 28 * n          # read theta, g, m, v; write theta, m, v (fp32)
        rows.append({"n": n, "dtype": "float32", "bytes": nbytes,
                     **(res if isinstance(res, dict) else
                        {"seconds": res, "gbs": round(nbytes / res / 1e9, 2)})})
        del p, opt
    return {"rows": rows}


def thresholds_section(args) -> dict:
    import torch
    from aim_kernels import ops
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n = (1 << 18) if args.dry else (1 << 28)
    g = torch.Generator(device=dev).manual_seed(1)
    omega = torch.rand(n, device=dev, generator=g)
    omega[: n // 3] = 0            # the first consolidation's zeros: one bin takes most
    layouts = {
        "dominant": [0, n * 97 // 100, n * 99 // 100, n],
        "G1000": [n * i // 1000 for i in range(1001)],
    }
    backends = ("cuda", "triton") if dev == "cuda" else ("cpu", "torch")
    rows = []
    for name, cuts in layouts.items():
        offsets = torch.tensor(cuts, dtype=torch.int64, device=dev)
        ratio = torch.full((len(cuts) - 1,), 0.3, dtype=torch.float64, device=dev)
        for backend in backends:
            why = ops.unavailable_reason(backend)
            row = {"n": n, "layout": name, "groups": len(cuts) - 1, "backend": backend}
            if why or (args.dry and backend == "torch" and name == "G1000"):
                rows.append({**row, "skipped": why or "reference: 1000 host round trips"})
                continue
            call = lambda: ops.group_thresholds(omega, offsets, ratio, backend=backend)  # noqa: E731
            res = _guard(timed, torch, call, 3 if args.dry else 5)
            rows.append({**row, **(res if isinstance(res, dict) else
                                   {"seconds": res, "read_gbs": round(4 * n / res / 1e9, 2)})})
    return {"rows": rows}


def _llava(torch, dry: bool):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    if dry:
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, image_size=28, patch_size=14)
        text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, vocab_size=128)
    else:   # CLIP ViT-L/14-336 (~300M) + a 12-layer 2048-wide Llama (~750M): ~1.05B
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14)
        text = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=12,
                           num_attention_heads=16, num_key_value_heads=16, vocab_size=32064)
    image_token = text.vocab_size - 1
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                      vision_feature_select_strategy="default", vision_feature_layer=-2)
    return LlavaForConditionalGeneration(cfg), image_token, vision


def masked_step_section(args) -> dict:
    import torch
    import aim_kernels as ak
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(dev):
        model, image_token, vision = _llava(torch, args.dry)
    model.to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    batch, text_len = (2, 8) if args.dry else (4, 64)
    tokens = (vision.image_size // vision.patch_size) ** 2
    pixels = torch.randn(batch, 3, vision.image_size, vision.image_size, device=dev,
                         dtype=torch.bfloat16)
    ids = torch.randint(3, image_token - 1, (batch, tokens + text_len), device=dev)
    ids[:, :tokens] = image_token
    state = ak.attach(model, ak.preset("aim"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=dev == "cuda")

    def step(with_aim: bool):
        out = model(input_ids=ids, pixel_values=pixels, labels=ids)
        out.loss.backward()
        if with_aim:
            ak.masked_step(model)
        opt.step()
        state.zero_grad()

    reps = 2 if args.dry else 5
    t_with = timed(torch, lambda: step(True), reps)
    t_without = timed(torch, lambda: step(False), reps)
    for p in model.parameters():   # a gradient to work on, for masked_step alone
        p.grad.normal_() if p.grad is not None else None
    t_aim = timed(torch, lambda: ak.masked_step(model), reps)
    return {"params": params, "dtype": "bfloat16", "batch": batch,
            "seq_len": tokens + text_len, "groups": state.group_names,
            "buckets": [b.key for b in state.buckets],
            "step_seconds": t_with, "step_without_aim_seconds": t_without,
            "masked_step_seconds": t_aim, "share": round(t_aim / t_with, 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry", action="store_true", help="CPU, small sizes (< 2 min)")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/...)")
    ap.add_argument("--budget", type=float, default=450.0,
                    help="seconds the whole check may take (the test runs get what is left)")
    args = ap.parse_args(argv)
    if args.dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")    # Triton on CPU tensors
    t0 = time.perf_counter()
    result = {"build": ensure_native(args.dry)}
    result["env"] = _guard(env_section, args)
    result["info"] = _run([sys.executable, "-m", "aim_kernels"], 120)
    # the figures first; then the test runs share what is left of the budget, so the
    # whole check ends inside it whatever they take (a cut run is recorded as such)
    result["fused_step"] = _guard(fused_step_section, args)
    result["adamw"] = _guard(adamw_section, args)
    result["group_thresholds"] = _guard(thresholds_section, args)
    result["masked_step"] = _guard(masked_step_section, args)
    args.deadline = t0 + args.budget
    result["tests"] = _guard(tests_section, args)
    result["sanitizer"] = _guard(sanitizer_section, args)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    env = result["env"] if "error" not in result["env"] else {}
    if args.out:
        out = Path(args.out)
    else:
        device = re.sub(r"[^A-Za-z0-9]+", "-", str(env.get("device", "unknown"))).strip("-")
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
        mode = "-dry" if args.dry else ""
        out = ROOT / "benchmarks" / "results" / f"gpu-check{mode}-{device}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(summary(result))
    print(f"wrote {out}")
    return 0


def summary(result: dict) -> str:
    lines = [f"gpu-check ({result.get('env', {}).get('mode')}) on "
             f"{result.get('env', {}).get('device')}: {result['seconds']} s"]
    for row in result.get("fused_step", {}).get("rows", []):
        lines.append(f"  fused_step n={row['n']:>10} {row['dtype']:>8} {row['backend']:>13}: "
                     + (f"{row['gbs']:8.1f} GB/s  {row['fraction_of_copy']:.2f} of copy"
                        if "gbs" in row else row.get("skipped") or row.get("error", "")[:60]))
    for row in result.get("adamw", {}).get("rows", []):
        lines.append(f"  fused AdamW n={row['n']:>10}: " +
                     (f"{row['gbs']:8.1f} GB/s" if "gbs" in row else row.get("error", "")[:60]))
    for row in result.get("group_thresholds", {}).get("rows", []):
        lines.append(f"  group_thresholds {row['layout']:>8} {row['backend']:>6}: " +
                     (f"{row['seconds'] * 1e3:8.2f} ms" if "seconds" in row
                      else row.get("skipped") or row.get("error", "")[:60]))
    ms = result.get("masked_step", {})
    if "share" in ms:
        lines.append(f"  masked_step share of a {ms['params'] / 1e9:.2f}B bf16 step: "
                     f"{ms['share']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
