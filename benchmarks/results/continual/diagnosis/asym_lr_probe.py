import sys, torch, time
import aim_kernels as ak
from aim_kernels.continual import data
from aim_kernels.continual.model import model_spec, make_model, inputs
from aim_kernels.continual.train import evaluate, _batches
torch.set_num_threads(1)
spec = model_spec("asym", int(sys.argv[2]) if len(sys.argv) > 2 else 0)
bench = data.make_benchmark(0)
skill = sys.argv[3] if len(sys.argv) > 3 else "colour"
for lr in [float(x) for x in sys.argv[1].split(",")]:
    model, info = make_model(spec, 0, None, "/tmp/tune12/cache-probe", bench=bench)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    t0 = time.time(); accs = []
    for step, (im, q, a) in enumerate(_batches([bench.train[skill]], 300, 32, gen)):
        pix, ids = inputs(model, im, q)
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids, pixel_values=pix).logits[:, -1], a)
        opt.zero_grad(); loss.backward(); opt.step()
        if step % 50 == 49:
            accs.append(round(evaluate(model, bench.test[skill]), 1))
    print(skill, "lr", lr, "acc every 50 steps", accs, f"{time.time() - t0:.0f} s", flush=True)
