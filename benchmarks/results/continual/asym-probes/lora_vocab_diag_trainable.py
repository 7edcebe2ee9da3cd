import time, torch, aim_kernels as ak
from aim_kernels.continual import data
from aim_kernels.continual.model import make_model, model_spec, inputs
from aim_kernels.continual.train import evaluate
torch.set_num_threads(1)
bench = data.make_benchmark(0)
for attach in (False,):
  for vocab in (True,):
      model, _ = make_model(model_spec("asym", 8), 0)
      [p.requires_grad_(True) for n, p in model.named_parameters() if "lm_head" in n or "embed_tokens" in n]
      tr = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad]
      print("trainable tensors", len(tr), "elements", sum(k for _, k in tr), tr[:3])
      if attach:
          ak.attach(model, ak.preset("naive"))
      params = [p for p in model.parameters() if p.requires_grad]
      opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
      s = bench.train["count"]; g = torch.Generator().manual_seed(0)
      before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
      for step in range(150):
          idx = torch.randint(0, len(s), (32,), generator=g)
          pix, ids = inputs(model, s.images[idx], s.questions[idx])
          loss = torch.nn.functional.cross_entropy(model(input_ids=ids, pixel_values=pix).logits[:, -1], s.answers[idx])
          opt.zero_grad(); loss.backward()
          if step == 0:
              gn = {n: (p.grad.norm().item() if p.grad is not None else None) for n, p in model.named_parameters() if p.requires_grad}
              print("grad norms (first 4):", list(gn.items())[:4], "none:", sum(v is None for v in gn.values()))
          if attach:
              ak.masked_step(model)
          opt.step()
          if step % 50 == 0: print(attach, step, round(loss.item(), 3))
      moved = sum((p.detach() - before[n]).norm().item() for n, p in model.named_parameters() if p.requires_grad)
      print("attach", attach, "count acc", evaluate(model, bench.test["count"]), "moved", moved)
