"""GaLore: reference numbers (galore-torch), a float64 NumPy oracle, layout, state."""

import importlib
import json
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peft_jax.optim as po

REFERENCE = json.loads(
    (pathlib.Path(__file__).parent / "data" / "galore_reference.json").read_text()
)


def mat(m, n, s):
  k = np.arange(m * n, dtype=np.float64).reshape(m, n)
  return (np.sin(0.37 * k + s) * (1 + k % 5) / 3).astype(np.float32)


# --------------------------------------------------------------------------
# Float64 NumPy oracle of galore_torch.GaLoreAdamW, in torch layout (out, in).


def _oracle_projector(g, rank, kind):
  u, _, vh = np.linalg.svd(g, full_matrices=False)
  return {"right": vh[:rank], "left": u[:, :rank], "full": (u[:, :rank], vh[:rank])}[kind]


def _oracle_kind(proj_type, m, n):
  if proj_type == "std":
    return "right" if m >= n else "left"
  if proj_type == "reverse_std":
    return "left" if m >= n else "right"
  return proj_type


class OracleGaLoreAdamW:
  """One parameter; `targeted=False` gives the plain (no projection) group."""

  def __init__(self, w, lr, rank, gap, scale, proj_type="std", b1=0.9, b2=0.999,
               eps=1e-6, weight_decay=0.0, targeted=True, reset_moments=False):
    self.w = np.asarray(w, np.float64)
    self.lr, self.rank, self.gap, self.scale = lr, rank, gap, scale
    self.kind = _oracle_kind(proj_type, *self.w.shape)
    self.b1, self.b2, self.eps, self.wd = b1, b2, eps, weight_decay
    self.targeted, self.reset = targeted, reset_moments
    self.step, self.p, self.m, self.v = 0, None, None, None

  def update(self, grad):
    g = np.asarray(grad, np.float64)
    t0 = self.step
    refresh = self.targeted and t0 % self.gap == 0
    if refresh:
      self.p = _oracle_projector(g, self.rank, self.kind)
    if self.targeted:
      if self.kind == "right":
        r = g @ self.p.T
      elif self.kind == "left":
        r = self.p.T @ g
      else:
        r = self.p[0].T @ g @ self.p[1].T
    else:
      r = g
    if self.m is None or (refresh and self.reset):
      self.m, self.v = np.zeros_like(r), np.zeros_like(r)
    self.m = self.b1 * self.m + (1 - self.b1) * r
    self.v = self.b2 * self.v + (1 - self.b2) * r * r
    self.step += 1
    t = (t0 % self.gap) + 1 if (self.reset and self.targeted) else self.step
    step_size = self.lr * np.sqrt(1 - self.b2**t) / (1 - self.b1**t)
    n = self.m / (np.sqrt(self.v) + self.eps)
    if self.targeted:
      if self.kind == "right":
        n = n @ self.p
      elif self.kind == "left":
        n = self.p @ n
      else:
        n = self.p[0] @ n @ self.p[1]
      n = n * self.scale
    self.w = self.w - step_size * n
    if self.wd > 0:
      self.w = self.w - self.lr * self.wd * self.w
    return self.w


def _run_jax(tx, w_torch, grads_torch, path=("mlp", "kernel")):
  """Runs `tx` on the Flax kernel (transpose); returns torch-layout weights."""
  params = {path[0]: {path[1]: jnp.asarray(w_torch.T)}}
  step = jax.jit(tx.update)
  state = tx.init(params)
  out = []
  for g in grads_torch:
    grads = {path[0]: {path[1]: jnp.asarray(g.T)}}
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
    out.append(np.asarray(params[path[0]][path[1]]).T)
  return out, state


@pytest.mark.parametrize(
    "case", REFERENCE["cases"],
    ids=lambda c: f"{c['proj_type']}-{c['m']}x{c['n']}-gap{c['gap']}-wd{c['weight_decay']}",
)
def test_matches_galore_torch_and_oracle(case):
  m, n = case["m"], case["n"]
  grads = [mat(m, n, t) for t in range(1, case["steps"] + 1)]
  tx = po.galore(
      case["lr"], rank=case["rank"], update_proj_gap=case["gap"], scale=case["scale"],
      proj_type=case["proj_type"], weight_decay=case["weight_decay"],
  )
  ours, state = _run_jax(tx, mat(m, n, 0), grads)
  oracle = OracleGaLoreAdamW(
      mat(m, n, 0), case["lr"], case["rank"], case["gap"], case["scale"],
      proj_type=case["proj_type"], weight_decay=case["weight_decay"],
  )
  # "full" keeps a 2x2 core whose small entries make m / (sqrt(v) + eps)
  # sensitive to float32 rounding of R; both implementations sit within
  # this bound of the float64 oracle.
  tol = 3e-5 if case["proj_type"] == "full" else 2e-6
  for t, g in enumerate(grads):
    expected_torch = np.array(case["w"][t], np.float32)
    expected_oracle = oracle.update(g)
    np.testing.assert_allclose(ours[t], expected_torch, atol=tol, rtol=0)
    np.testing.assert_allclose(ours[t], expected_oracle, atol=tol, rtol=0)
  # State shapes: the reference's, transposed to the Flax kernel's layout.
  galore_state = state[0]
  moment = galore_state.mu["mlp"]["kernel"].shape
  assert moment == tuple(reversed(case["moment_shape"]))
  in_p = galore_state.in_projector["mlp"]["kernel"].shape
  out_p = galore_state.out_projector["mlp"]["kernel"].shape
  ref_p = case["projector_shape"]
  if case["proj_type"] == "full":
    assert out_p == tuple(ref_p[0]) and in_p == tuple(reversed(ref_p[1]))
  elif tuple(ref_p)[0] == case["rank"]:  # Vh[:r] (r, in): the input side
    assert in_p == (n, case["rank"]) and out_p == (0,)
  else:  # U[:, :r] (out, r): the output side
    assert out_p == (m, case["rank"]) and in_p == (0,)


def test_square_matrix_projects_input_side_like_reference():
  # A square (out == in) matrix uses the reference's "right": Vh of W = U of K.
  info = po.galore_projected_paths({"attn": {"kernel": jnp.zeros((6, 6))}}, rank=2)
  assert info["attn/kernel"]["side"] == "in"
  # Tall Flax kernel (in > out) = wide torch weight (out < in) -> "left" = out side.
  info = po.galore_projected_paths({"attn": {"kernel": jnp.zeros((8, 4))}}, rank=2)
  assert info["attn/kernel"]["side"] == "out"


def test_oracle_longer_run_with_refresh_reset_and_plain_params():
  """Several refreshes, plain-AdamW leaves and moment reset vs the oracle."""
  rng = np.random.default_rng(0)
  shapes = {"mlp": (12, 7), "attn": (5, 9)}  # torch layout (out, in)
  w0 = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
  bias0 = rng.standard_normal(7).astype(np.float32)
  grads = [
      ({k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()},
       rng.standard_normal(7).astype(np.float32))
      for _ in range(7)
  ]
  for reset in (False, True):
    tx = po.galore(0.05, rank=3, update_proj_gap=3, scale=0.5, weight_decay=0.01,
                   reset_moments=reset)
    params = {k: {"kernel": jnp.asarray(v.T)} for k, v in w0.items()}
    params["norm"] = {"bias": jnp.asarray(bias0)}
    oracles = {k: OracleGaLoreAdamW(v, 0.05, 3, 3, 0.5, weight_decay=0.01, reset_moments=reset)
               for k, v in w0.items()}
    oracles["norm"] = OracleGaLoreAdamW(bias0[None], 0.05, 3, 3, 0.5, weight_decay=0.01,
                                        targeted=False)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for gk, gb in grads:
      g = {k: {"kernel": jnp.asarray(v.T)} for k, v in gk.items()}
      g["norm"] = {"bias": jnp.asarray(gb)}
      updates, state = step(g, state, params)
      params = optax.apply_updates(params, updates)
      for k in shapes:
        np.testing.assert_allclose(np.asarray(params[k]["kernel"]).T,
                                   oracles[k].update(gk[k]), atol=5e-6)
      np.testing.assert_allclose(params["norm"]["bias"], oracles["norm"].update(gb[None])[0],
                                 atol=5e-6)
    assert state[0].mu["norm"]["bias"].shape == (7,)


def test_stacked_layers_get_one_projector_per_layer():
  """(L, in, out) equals L independent 2-D runs, including across a refresh."""
  rng = np.random.default_rng(1)
  L, n_in, n_out = 3, 6, 10
  w = rng.standard_normal((L, n_in, n_out)).astype(np.float32)
  grads = [rng.standard_normal((L, n_in, n_out)).astype(np.float32) for _ in range(4)]
  tx = po.galore(0.1, rank=2, update_proj_gap=2)
  step = jax.jit(tx.update)
  params = {"layers": {"mlp": {"kernel": jnp.asarray(w)}}}
  state = tx.init(params)
  stacked = []
  for g in grads:
    updates, state = step({"layers": {"mlp": {"kernel": jnp.asarray(g)}}}, state, params)
    params = optax.apply_updates(params, updates)
    stacked.append(np.asarray(params["layers"]["mlp"]["kernel"]))
  assert state[0].in_projector["layers"]["mlp"]["kernel"].shape == (L, n_in, 2)
  for layer in range(L):
    single, _ = _run_jax(tx, w[layer].T, [g[layer].T for g in grads])
    for a, b in zip(stacked, single):
      np.testing.assert_allclose(a[layer], b.T, atol=1e-6)


@pytest.mark.parametrize("group_bytes", [1 << 28, 1])  # one batch / one matrix per chunk
def test_separate_same_shape_layers_refresh_as_one_batch(monkeypatch, group_bytes):
  """Unrolled layers (one leaf each, refreshed as one batch) equal the stacked leaf."""
  galore_module = importlib.import_module("peft_jax.optim.galore")
  monkeypatch.setattr(galore_module, "_GROUP_BYTES", group_bytes)
  rng = np.random.default_rng(5)
  L, n_in, n_out = 3, 6, 10
  w = rng.standard_normal((L, n_in, n_out)).astype(np.float32)
  grads = [rng.standard_normal((L, n_in, n_out)).astype(np.float32) for _ in range(3)]
  tx = po.galore(0.1, rank=2, update_proj_gap=2)
  stacked = {"layers": {"mlp": {"kernel": jnp.asarray(w)}}}
  unrolled = {f"layers_{i}": {"mlp": {"kernel": jnp.asarray(w[i])}} for i in range(L)}
  s_stacked, s_unrolled = tx.init(stacked), tx.init(unrolled)
  step = jax.jit(tx.update)
  for g in grads:
    u_s, s_stacked = step({"layers": {"mlp": {"kernel": jnp.asarray(g)}}}, s_stacked, stacked)
    u_u, s_unrolled = step({f"layers_{i}": {"mlp": {"kernel": jnp.asarray(g[i])}}
                            for i in range(L)}, s_unrolled, unrolled)
    for i in range(L):
      np.testing.assert_allclose(u_u[f"layers_{i}"]["mlp"]["kernel"],
                                 u_s["layers"]["mlp"]["kernel"][i], atol=1e-6)


def test_dense_general_dimension_numbers():
  """A (embed, heads, head_dim) kernel equals the reshaped 2-D kernel."""
  rng = np.random.default_rng(2)
  w3 = rng.standard_normal((8, 2, 6)).astype(np.float32)
  grads = [rng.standard_normal(w3.shape).astype(np.float32) for _ in range(3)]
  dims = {".*q_proj/kernel": po.GaLoreDimensionNumbers(reduction_axis=0, output_axis=(1, 2))}
  tx3 = po.galore(0.1, rank=2, update_proj_gap=2, dimension_numbers=dims)
  tx2 = po.galore(0.1, rank=2, update_proj_gap=2)
  p3 = {"attn": {"q_proj": {"kernel": jnp.asarray(w3)}}}
  p2 = {"attn": {"q_proj": {"kernel": jnp.asarray(w3.reshape(8, 12))}}}
  s3, s2 = tx3.init(p3), tx2.init(p2)
  for g in grads:
    u3, s3 = tx3.update({"attn": {"q_proj": {"kernel": jnp.asarray(g)}}}, s3, p3)
    u2, s2 = tx2.update({"attn": {"q_proj": {"kernel": jnp.asarray(g.reshape(8, 12))}}}, s2, p2)
    np.testing.assert_allclose(u3["attn"]["q_proj"]["kernel"].reshape(8, 12),
                               u2["attn"]["q_proj"]["kernel"], atol=1e-6)


def test_targets_rank_per_path_and_errors():
  params = {
      "model": {
          "embed_tokens": {"embedding": jnp.zeros((50, 16))},
          "layers_0": {"self_attn": {"q_proj": {"kernel": jnp.zeros((16, 16))}},
                       "mlp": {"up_proj": {"kernel": jnp.zeros((16, 40))}},
                       "input_layernorm": {"weight": jnp.zeros(16)}},
      },
      "lm_head": {"kernel": jnp.zeros((16, 50))},
  }
  info = po.galore_projected_paths(params, rank={".*mlp.*": 4, ".*": 8})
  assert set(info) == {"model/layers_0/self_attn/q_proj/kernel",
                       "model/layers_0/mlp/up_proj/kernel"}
  assert info["model/layers_0/mlp/up_proj/kernel"]["rank"] == 4
  assert info["model/layers_0/self_attn/q_proj/kernel"]["rank"] == 8
  state = po.galore(rank=4).init(params)
  assert state[0].mu["lm_head"]["kernel"].shape == (16, 50)  # full-size AdamW
  assert state[0].mu["model"]["layers_0"]["mlp"]["up_proj"]["kernel"].shape == (4, 40)
  with pytest.raises(ValueError, match="q_prj"):
    po.galore(targets=".*q_prj/kernel").init(params)
  with pytest.raises(ValueError, match="matrices"):
    po.galore(targets=".*layernorm/weight").init(params)
  with pytest.raises(ValueError, match="proj_type"):
    po.galore(proj_type="diagonal")


def test_randomized_refresh_spans_top_subspace():
  rng = np.random.default_rng(3)
  # Low-rank-plus-noise gradient: the randomized range finder must recover
  # the dominant subspace almost exactly.
  u = np.linalg.qr(rng.standard_normal((64, 4)))[0]
  v = np.linalg.qr(rng.standard_normal((48, 4)))[0]
  g = (u * [10.0, 8.0, 6.0, 4.0]) @ v.T + 0.01 * rng.standard_normal((64, 48))
  params = {"mlp": {"kernel": jnp.zeros((64, 48), jnp.float32)}}
  grads = {"mlp": {"kernel": jnp.asarray(g, jnp.float32)}}
  projectors = {}
  for method in ("svd", "randomized"):
    tx = po.scale_by_galore(rank=4, refresh=method, proj_type="full")
    _, state = tx.update(grads, tx.init(params), None)
    projectors[method] = (state.in_projector["mlp"]["kernel"],
                          state.out_projector["mlp"]["kernel"])
  for a, b in zip(projectors["svd"], projectors["randomized"]):
    # Same subspace: the projector matrices Q Q^T agree.
    np.testing.assert_allclose(a @ a.T, b @ b.T, atol=1e-3)


def test_inject_hyperparams_and_chain_with_clipping():
  params = {"mlp": {"kernel": jnp.ones((6, 4))}, "b": jnp.ones(3)}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 2.0), params)
  sched = optax.linear_schedule(1e-2, 0.0, 10)
  tx = optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.inject_hyperparams(po.galore, static_args=("rank", "update_proj_gap"))(
          learning_rate=sched, rank=2, update_proj_gap=2, weight_decay=0.1, scale=0.5),
  )
  state = tx.init(params)
  step = jax.jit(tx.update)
  for _ in range(3):
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert np.isfinite(np.asarray(params["mlp"]["kernel"])).all()
  np.testing.assert_allclose(state[1].hyperparams["learning_rate"], sched(2), rtol=1e-6)  # last step used


def test_bf16_params_keep_dtype():
  params = {"mlp": {"kernel": jnp.ones((8, 4), jnp.bfloat16)}}
  tx = po.galore(1e-2, rank=2)
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(
      jax.tree.map(lambda p: jnp.linspace(-1, 1, p.size).reshape(p.shape).astype(p.dtype), params),
      state, params)
  assert updates["mlp"]["kernel"].dtype == jnp.bfloat16
  assert state[0].out_projector["mlp"]["kernel"].dtype == jnp.bfloat16
  chex.assert_tree_all_finite(updates)


def test_auto_refresh_is_exact_on_small_matrices_and_randomized_on_large():
  galore_module = importlib.import_module("peft_jax.optim.galore")
  dims = po.GaLoreDimensionNumbers()
  small = galore_module._make_plan("a", (8, 12), dims, 4, "std")  # pylint: disable=protected-access
  large = galore_module._make_plan("a", (48, 64), dims, 4, "std")  # pylint: disable=protected-access
  assert galore_module._resolve_refresh("auto", small, 8) == "svd"  # pylint: disable=protected-access
  assert galore_module._resolve_refresh("auto", large, 8) == "randomized"  # pylint: disable=protected-access
  assert galore_module._resolve_refresh("svd", large, 8) == "svd"  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="refresh"):
    po.galore(refresh="lanczos")


@pytest.mark.parametrize("kernel_shape", [(48, 64), (64, 48)])  # in side, out side projected
def test_default_refresh_spans_top_subspace_one_sided_and_never_retraces(kernel_shape):
  rng = np.random.default_rng(4)
  n_in, n_out = kernel_shape
  u = np.linalg.qr(rng.standard_normal((n_in, 4)))[0]
  v = np.linalg.qr(rng.standard_normal((n_out, 4)))[0]
  g = (u * [10.0, 8.0, 6.0, 4.0]) @ v.T + 0.01 * rng.standard_normal(kernel_shape)
  params = {"mlp": {"kernel": jnp.zeros(kernel_shape, jnp.float32)}}
  grads = {"mlp": {"kernel": jnp.asarray(g, jnp.float32)}}
  projectors = {}
  for method in ("svd", "auto"):
    tx = po.scale_by_galore(rank=4, update_proj_gap=2, refresh=method)
    update = jax.jit(tx.update)
    state = tx.init(params)
    for _ in range(3):  # refresh, plain step, refresh
      _, state = update(grads, state, None)
    assert update._cache_size() == 1  # pylint: disable=protected-access
    side = state.in_projector if n_out >= n_in else state.out_projector
    projectors[method] = np.asarray(side["mlp"]["kernel"])
    # A zero gradient at a refresh (singular Nystrom core): finite orthonormal projector.
    zero, zero_state = update(jax.tree.map(jnp.zeros_like, grads), tx.init(params), None)
    side = zero_state.in_projector if n_out >= n_in else zero_state.out_projector
    np.testing.assert_allclose(side["mlp"]["kernel"].T @ side["mlp"]["kernel"], np.eye(4),
                               atol=1e-5)
    assert not np.asarray(zero["mlp"]["kernel"]).any()
  a, b = projectors["svd"], projectors["auto"]
  assert a.shape == b.shape == (min(kernel_shape), 4)
  np.testing.assert_allclose(b.T @ b, np.eye(4), atol=1e-5)  # orthonormal
  np.testing.assert_allclose(a @ a.T, b @ b.T, atol=1e-3)  # the same subspace


@pytest.mark.parametrize("refresh", ["svd", "auto"])
def test_cpu_refresh_hands_lapack_one_matrix_per_call(refresh):
  """jaxlib's batched CPU LAPACK kernels block on XLA's thread pool: two at once hang.

  Every LAPACK call of the compiled step must see a single matrix (it then
  runs inline), for stacked layers and same-shape leaves refreshed as one batch.
  """
  import re  # pylint: disable=import-outside-toplevel
  params = {"a": {"mlp": {"kernel": jnp.zeros((3, 48, 64))}},
            "b": {"mlp": {"kernel": jnp.zeros((64, 48))}},
            "c": {"mlp": {"kernel": jnp.zeros((64, 48))}}}
  tx = po.scale_by_galore(rank=4, update_proj_gap=2, refresh=refresh)
  hlo = jax.jit(tx.update).lower(params, tx.init(params)).compile().as_text()
  calls = [line for line in hlo.splitlines() if 'custom_call_target="lapack_' in line]
  assert calls, "expected LAPACK calls in the refresh"
  for line in calls:
    # Result and operand shapes before the target: matrices/vectors/scalars, no batch axis.
    shapes = re.findall(r"f32\[([0-9,]*)\]", line.split("custom_call_target")[0])
    assert shapes and all(s.count(",") <= 1 for s in shapes), line
