"""Generates tests/data/galore_reference.json from galore-torch (not run by pytest).

Run with a Python that has torch and galore-torch (e.g. /work/refvenv):
    /work/refvenv/bin/python tests/data/make_galore_reference.py

Cases (ALGORITHMS.md section 3.3): W0 = mat(m, n, 0), gradients mat(m, n, t)
for t = 1, 2, 3, where mat(m,n,s)[i,j] = float32(sin(0.37(i*n+j)+s) *
(1 + (i*n+j) mod 5) / 3). Shapes are in torch layout (out, in).
"""
import json
import pathlib
import platform

import numpy as np
import torch
import galore_torch


def mat(m, n, s):
    k = np.arange(m * n, dtype=np.float64).reshape(m, n)
    return (np.sin(0.37 * k + s) * (1 + k % 5) / 3).astype(np.float32)


def run(m, n, gap, steps, proj_type="std", lr=0.01, rank=2, scale=0.25, weight_decay=0.0):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.from_numpy(mat(m, n, 0)))
    opt = galore_torch.GaLoreAdamW(
        [{"params": [w], "rank": rank, "update_proj_gap": gap, "scale": scale,
          "proj_type": proj_type}],
        lr=lr, weight_decay=weight_decay)
    ws = []
    for t in range(1, steps + 1):
        w.grad = torch.from_numpy(mat(m, n, t))
        opt.step()
        ws.append(w.detach().numpy().copy().tolist())
    st = opt.state[w]
    proj = st["projector"].ortho_matrix
    proj_shape = [list(p.shape) for p in proj] if isinstance(proj, list) else list(proj.shape)
    return {
        "m": m, "n": n, "gap": gap, "steps": steps, "proj_type": proj_type, "lr": lr,
        "rank": rank, "scale": scale, "weight_decay": weight_decay,
        "w0": mat(m, n, 0).tolist(), "w": ws,
        "projector_shape": proj_shape, "moment_shape": list(st["exp_avg"].shape),
    }


cases = []
for (m, n) in [(8, 4), (4, 8), (4, 4)]:
    for gap, steps in [(200, 2), (2, 3)]:
        cases.append(run(m, n, gap, steps))
for pt in ["reverse_std", "left", "right", "full"]:
    for (m, n) in [(8, 4), (4, 8), (4, 4)]:
        cases.append(run(m, n, 2, 3, proj_type=pt))
# Decoupled weight decay placement.
cases.append(run(8, 4, 2, 3, weight_decay=0.1))
cases.append(run(4, 8, 200, 2, weight_decay=0.1))

out = {
    "_meta": {
        "source": f"galore-torch {getattr(galore_torch, '__version__', '1.0')}, torch {torch.__version__}",
        "generator": "tests/data/make_galore_reference.py",
        "layout": "torch (out, in); a Flax kernel is the transpose",
        "formula": "mat(m,n,s)[i,j] = float32(sin(0.37(i*n+j)+s)*(1+(i*n+j) mod 5)/3); W0=mat(m,n,0); grad_t=mat(m,n,t)",
        "python": platform.python_version(),
    },
    "cases": cases,
}
path = pathlib.Path(__file__).with_name("galore_reference.json")
path.write_text(json.dumps(out))
print("wrote", path, len(cases), "cases")
