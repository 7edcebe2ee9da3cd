"""Why mm-ewc / aim learn nothing after task 1: per task, per group, mask share and |r|/|g|."""
import sys, json, torch
import aim_kernels as ak
from aim_kernels.continual import data, train
from aim_kernels.continual.train import RunConfig, run_method
torch.set_num_threads(1)
rows = []
orig = ak.masked_step
def wrapped(model, *a, **k):
    st = orig(model, *a, **k)
    rows.append(st.as_dict())
    return st
ak.masked_step = wrapped
method = sys.argv[1]
ov = json.loads(sys.argv[2]) if len(sys.argv) > 2 else None
if ov and "role_values" in ov:
    ov["role_values"] = {r: ak.config.RoleValues(*v) for r, v in ov["role_values"].items()}
steps = 300
rc = RunConfig(steps=steps, lr=4e-3, progress=False)
bench = data.make_benchmark(0)
from aim_kernels.continual.model import make_model
r = run_method(method, bench, data.SKILLS, 0, rc, ov)
print(method, ov, "AP %.1f AF %.1f" % (r["ap"], r["af"]), "diag", [round(r["acc_matrix"][i][i]) for i in range(6)])
sizes = None
for k in range(6):
    seg = rows[k * steps:(k + 1) * steps]
    out = []
    for g in seg[0]:
        gs = sum(x[g]["grad_sq"] for x in seg); rs = sum(x[g]["reg_sq"] for x in seg)
        out.append(f"{g}: masked {seg[-1][g]['masked']:.0f} |r|/|g| {(rs / max(gs, 1e-30)) ** .5:.3g} drift_rms_end {seg[-1][g]['drift_sq']:.3g}")
    print(f" task {k} {data.SKILLS[k]}:", "; ".join(out))
