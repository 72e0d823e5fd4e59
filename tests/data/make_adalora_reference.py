"""Generates tests/data/adalora_reference.json from Hugging Face PEFT (not run by pytest).

Run with a Python that has torch and peft (e.g. /work/refvenv, torch 2.13.0, peft 0.21.2):
    /work/refvenv/bin/python tests/data/make_adalora_reference.py

Contents (ALGORITHMS.md section 5):
* `budget`: `RankAllocator.budget_schedule(t)` at every step 0..T+5 for two
  schedules (the ALGORITHMS.md table's, and one with awkward numbers).
* `run`: a training run of a two-layer net `y = lin1(tanh(lin0(x)))` with
  both layers adapted (`SVDLinear`), SGD(lr) on the AdaLoraModel loss
  (mean squared error + orth_reg_weight * regulariser), and
  `update_and_allocate(t)` after every `optimizer.step()`. Recorded per step:
  the loss and the MSE before the step, the budget, every EMA
  (`exp_avg_ipt`, `exp_avg_unc`), `lora_E` after allocation, and
  `config.rank_pattern`. All matrices are in torch layout (out, in); lora_E
  is (r, 1).
Inputs are mat(m, n, s)[i, j] = float32(sin(0.37 k + s) (1 + k mod 5) / 3),
k = i n + j, so the test can rebuild them.
"""
import dataclasses
import json
import pathlib
import platform
from typing import Optional

import numpy as np
import peft
import torch
from peft import AdaLoraConfig, get_peft_model
from peft.tuners.adalora.layer import RankAllocator
from transformers.utils import ModelOutput


def mat(m, n, s):
    k = np.arange(m * n, dtype=np.float64).reshape(m, n)
    return (np.sin(0.37 * k + s) * (1 + k % 5) / 3).astype(np.float32)


def budget_vector(init_bgt, target_bgt, **schedule):
    config = AdaLoraConfig(target_modules=["x"], **schedule)
    allocator = RankAllocator.__new__(RankAllocator)
    allocator.peft_config = config
    allocator.init_bgt, allocator.target_bgt = init_bgt, target_bgt
    steps = range(config.total_step + 6)
    pairs = [allocator.budget_schedule(t) for t in steps]
    return {"init_bgt": init_bgt, "target_bgt": target_bgt, "schedule": schedule,
            "budget": [int(b) for b, _ in pairs], "mask": [bool(m) for _, m in pairs]}


@dataclasses.dataclass
class Output(ModelOutput):
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None


class Net(torch.nn.Module):
    def __init__(self, n_in, n_hidden, n_out):
        super().__init__()
        self.lin0 = torch.nn.Linear(n_in, n_hidden)
        self.lin1 = torch.nn.Linear(n_hidden, n_out)

    def forward(self, x, y):
        out = self.lin1(torch.tanh(self.lin0(x)))
        return Output(loss=((out - y) ** 2).mean(), logits=out)


def training_run():
    dims = {"n_in": 6, "n_hidden": 5, "n_out": 4}
    schedule = dict(init_r=3, target_r=2, tinit=1, tfinal=3, deltaT=2, total_step=10,
                    beta1=0.85, beta2=0.85, orth_reg_weight=0.5)
    lora_alpha, lr, batch, steps = 4.0, 0.1, 8, 12
    net = Net(**dims)
    shapes = {"lin0": (dims["n_hidden"], dims["n_in"]), "lin1": (dims["n_out"], dims["n_hidden"])}
    init = {}
    with torch.no_grad():
        for i, (name, (out_f, in_f)) in enumerate(shapes.items()):
            layer = getattr(net, name)
            layer.weight.copy_(torch.from_numpy(mat(out_f, in_f, 1 + i)))
            layer.bias.copy_(torch.from_numpy(mat(1, out_f, 3 + i)[0]))
    config = AdaLoraConfig(target_modules=["lin0", "lin1"], lora_alpha=lora_alpha,
                           lora_dropout=0.0, **schedule)
    model = get_peft_model(net, config)
    r = schedule["init_r"]
    with torch.no_grad():
        for i, (name, (out_f, in_f)) in enumerate(shapes.items()):
            layer = getattr(model.base_model.model, name)
            a = mat(r, in_f, 5 + i) / 4
            b = mat(out_f, r, 7 + i) / 4
            e = mat(r, 1, 9 + i) / 2
            layer.lora_A["default"].copy_(torch.from_numpy(a))
            layer.lora_B["default"].copy_(torch.from_numpy(b))
            layer.lora_E["default"].copy_(torch.from_numpy(e))
            init[name] = {"weight": layer.base_layer.weight.detach().numpy().tolist(),
                          "bias": layer.base_layer.bias.detach().numpy().tolist(),
                          "lora_A": a.tolist(), "lora_B": b.tolist(), "lora_E": e.tolist()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    allocator = model.base_model.rankallocator
    records = []
    for t in range(steps):
        x = torch.from_numpy(mat(batch, dims["n_in"], 10 + t))
        y = torch.from_numpy(mat(batch, dims["n_out"], 30 + t))
        out = model.base_model(x, y)  # AdaLoraModel.forward adds the regulariser
        mse = float(((out.logits - y) ** 2).mean().detach())
        loss = out.loss
        loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(t)
        budget, mask_ind = allocator.budget_schedule(t)
        rec = {"t": t, "loss": loss.item(), "mse": mse, "budget": int(budget),
               "schedule_mask": bool(mask_ind), "ema": {}, "lora_E": {}, "lora_A": {}, "lora_B": {}}
        for name in shapes:
            layer = getattr(model.base_model.model, name)
            rec["lora_E"][name] = layer.lora_E["default"].detach().numpy().tolist()
            rec["lora_A"][name] = layer.lora_A["default"].detach().numpy().tolist()
            rec["lora_B"][name] = layer.lora_B["default"].detach().numpy().tolist()
            for leaf in ("lora_A", "lora_B", "lora_E"):
                key = f"{name}.{leaf}.default"  # names in the wrapped Net
                if key in allocator.exp_avg_ipt:
                    rec["ema"][f"{name}/{leaf}"] = {
                        "ipt": allocator.exp_avg_ipt[key].numpy().tolist(),
                        "unc": allocator.exp_avg_unc[key].numpy().tolist()}
        pattern = model.peft_config["default"].rank_pattern
        rec["rank_pattern"] = (None if pattern is None else {
            k.split(".lora_E")[0]: [bool(v) for v in val] for k, val in pattern.items()})
        records.append(rec)
        optimizer.zero_grad()
    return {"dims": dims, "schedule": schedule, "lora_alpha": lora_alpha, "lr": lr,
            "batch": batch, "steps": steps, "init": init, "records": records,
            "input_seeds": {"x": "mat(batch, n_in, 10 + t)", "y": "mat(batch, n_out, 30 + t)"}}


def main():
    torch.manual_seed(0)
    out = {
        "_meta": {"peft": peft.__version__, "torch": torch.__version__,
                  "python": platform.python_version(),
                  "generator": "tests/data/make_adalora_reference.py"},
        "budget": [
            budget_vector(120, 80, init_r=12, target_r=8, tinit=200, tfinal=1000,
                          total_step=3000, deltaT=10),
            budget_vector(7 * 13, 3 * 13, init_r=7, target_r=3, tinit=17, tfinal=41,
                          total_step=997, deltaT=3),
        ],
        "run": training_run(),
    }
    path = pathlib.Path(__file__).parent / "adalora_reference.json"
    path.write_text(json.dumps(out, separators=(",", ":")) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
