"""Mixed-adapter batches vs looping over adapters (serving K task adapters).

For K adapters and 2 rows per adapter, three ways to run one batch:

* ``mixed``: one jitted call on all 2K rows, each row gathering its own
  adapter (``peft_jax.multitask.mixed_adapters``);
* ``loop``: K jitted calls, each on its adapter's 2 rows with that adapter
  beside the base (``peft_jax.apply``), the way one serves without mixing;
* ``base``: one call on all 2K rows without adapters (the floor).

Timed interleaved (mixed, loop, base, mixed, ...), median / min / max, and
reported as ratios from the same run (see ../shared/BENCHMARKS.md). Writes
``benchmarks/results/multitask.json`` and ``.md``.

    python benchmarks/bench_multitask.py [--quick]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402  pylint: disable=wrong-import-position

import peft_jax as pj  # noqa: E402
from peft_jax import multitask  # noqa: E402
from peft_jax.models import LlamaConfig, LlamaForCausalLM, init_params  # noqa: E402

MODEL = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2)
ROWS_PER_ADAPTER = 2


def run_case(num_adapters: int, seq_len: int, reps: int, rank: int) -> dict:
  llama = LlamaConfig(**MODEL)
  model = LlamaForCausalLM(llama)
  params = init_params(llama, jax.random.key(0))
  config = pj.LoRAConfig(rank=rank, alpha=2.0 * rank, target_modules="all-linear")
  rng = np.random.default_rng(0)
  library = {}
  for k in range(num_adapters):
    adapters, base = pj.split(pj.lora_transform(params, config, key=jax.random.key(k)))
    adapters = jax.tree.map(lambda x: jnp.asarray(0.02 * rng.normal(size=x.shape), x.dtype),
                            adapters)
    library[f"task{k}"] = multitask.TaskAdapter(adapters, config)
  names = [n for n in library for _ in range(ROWS_PER_ADAPTER)]
  tokens = jnp.asarray(rng.integers(0, llama.vocab_size, (len(names), seq_len)), jnp.int32)
  stack = multitask.stack_adapters(library)
  stacked_params = multitask.attach(base, stack)
  index = stack.index(names)

  @jax.jit
  def mixed(params, tokens, index):
    with multitask.mixed_adapters(index):
      return model.apply({"params": params}, tokens)

  single = jax.jit(lambda params, tokens: pj.apply(model, params, tokens, config=config))
  plain = jax.jit(lambda params, tokens: model.apply({"params": params}, tokens))
  per_task = [(multitask.with_adapter(base, library, n)[0],
               tokens[k * ROWS_PER_ADAPTER:(k + 1) * ROWS_PER_ADAPTER])
              for k, n in enumerate(library)]

  def loop():
    return [single(p, t) for p, t in per_task]

  mixed_logits = mixed(stacked_params, tokens, index)
  loop_logits = jnp.concatenate(loop())
  max_abs_diff = float(jnp.max(jnp.abs(mixed_logits - loop_logits)))
  # Sanity: the adapters do change the output (else equality above would be vacuous).
  adapter_effect = float(jnp.max(jnp.abs(mixed_logits - plain(base, tokens))))
  timings = _common.time_interleaved({
      "mixed": lambda: mixed(stacked_params, tokens, index),
      "loop": loop,
      "base": lambda: plain(base, tokens),
  }, reps=reps, warmup=1)
  flops = {
      "mixed": _common.flops(mixed.lower(stacked_params, tokens, index).compile()),
      "loop": num_adapters * (_common.flops(single.lower(*per_task[0]).compile()) or 0.0),
      "base": _common.flops(plain.lower(base, tokens).compile()),
  }
  return {
      "num_adapters": num_adapters, "rows": len(names), "seq_len": seq_len, "rank": rank,
      "targets": "all-linear", "max_abs_diff_mixed_vs_loop": max_abs_diff,
      "max_abs_adapter_effect": adapter_effect,
      "adapter_bytes_per_task": _common.tree_bytes(library["task0"].adapters),
      "timings": timings, "flops": flops,
      "ratios": {"loop_over_mixed": _common.ratio(timings, "loop", "mixed"),
                 "mixed_over_base": _common.ratio(timings, "mixed", "base")},
  }


def markdown(result: dict) -> str:
  rows = []
  for case in result["cases"]:
    t = case["timings"]
    spread = lambda name: (f"{_common.ms(t[name]['median_s'])} "
                           f"({_common.ms(t[name]['min_s'])}-{_common.ms(t[name]['max_s'])})")
    with_spread = lambda r: f"{r['ratio']:.2f}x ({r['paired_min']:.2f}-{r['paired_max']:.2f})"
    rows.append([
        case["num_adapters"], f"{case['rows']} x {case['seq_len']}", spread("mixed"),
        spread("loop"), spread("base"),
        with_spread(case["ratios"]["loop_over_mixed"]),
        with_spread(case["ratios"]["mixed_over_base"]),
        f"{case['max_abs_diff_mixed_vs_loop']:.1e} (adapters move logits by "
        f"{case['max_abs_adapter_effect']:.1e})"])
  table = _common.markdown_table(
      ["adapters K", "batch (rows x tokens)", "mixed: median (min-max)", "loop over K",
       "base, no adapters", "loop / mixed", "mixed / base", "max |mixed - loop|"], rows)
  m = result["machine"]
  return (f"# Mixed-adapter batches vs looping over adapters\n\n"
          f"Model: Llama {MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}, "
          f"vocab {MODEL['vocab_size']}; LoRA rank {result['cases'][0]['rank']} on all linear "
          f"layers; {ROWS_PER_ADAPTER} rows per adapter; float32; {result['reps']} interleaved "
          f"reps (per-rep ratios in parentheses).\n\n{table}\n\n"
          f"Machine: {_common.machine_line(m)}\n")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="small sizes, few reps")
  args = parser.parse_args()
  # (K adapters, tokens per row): prefill-like rows of 64 tokens, and decode-like
  # steps of one token per row, where the loop's K calls cost the most.
  if args.quick:
    cases, reps = ((2, 16), (4, 1)), 3
  else:
    cases, reps = ((2, 64), (4, 64), (8, 64), (4, 1), (8, 1), (16, 1)), 10
  result = {"machine": _common.machine_info(), "reps": reps, "model": MODEL,
            "cases": [run_case(k, seq_len, reps, rank=8) for k, seq_len in cases]}
  name = "multitask_quick" if args.quick else "multitask"
  _common.write_json(_common.RESULTS / f"{name}.json", result)
  text = markdown(result)
  (_common.RESULTS / f"{name}.md").write_text(text)
  print(text)


if __name__ == "__main__":
  main()
