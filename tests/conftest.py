"""Keeps the default run under 15 minutes on 2 cores.

Three levers: XLA's back end without LLVM optimization, one compilation cache
shared by the test processes, and the repeated heavy tests below marked slow.

The tests below each took 20-60 s in the default run (2026-12-01, 2 cores:
851 tests in 23 min, over the 15-minute budget) and each repeats what a cheaper default test already
covers (another parametrization, another method through the same path, the
same check on one more model). They run with ``-m slow``, with everything
else that is long.
"""

import atexit
import os
import shutil
import tempfile

import pytest

# XLA's LLVM back end without optimization (-O0 instead of -O3): the HLO passes
# (fusion, layout, what is computed) are the same, the machine code is not
# optimized. The suite is mostly compilation of small programs: this takes
# about a third off its CPU time (tests/test_qlora.py + test_gemma3.py: 149 s
# at -O3, 125 s at -O1, 96 s at -O0), and the numbers differ only by float32
# rounding order. Set before JAX starts, and inherited by the subprocesses the
# CLI tests run. A user's or a test's own setting wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()

# One XLA compilation cache for the session, in a fresh temporary folder: the
# command-line tests start a Python process per run, and those processes compile
# the same train steps of the same tiny models again (tests/test_cli.py: 84 s of
# CPU without it, 66 s with it). The folder is the session's own and is removed
# at exit; a user's own JAX_COMPILATION_CACHE_DIR is left alone.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE_DIR = tempfile.mkdtemp(prefix="peft_jax_tests_xla_cache_")
  atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

SLOW_IN_DEFAULT_RUN = {
    # 8 simulated devices in a subprocess (~20 s idle); the one-device nf4_attend checks stay
    "tests/test_nf4_embed.py::test_tied_nf4_head_on_a_mesh_matches_one_device",
    # the untied twin runs by default; DoRA/AdaLoRA twins repeat the LoRA/QLoRA twins' path
    "tests/test_fused_ce.py::test_train_step_loss_matches_unfused_and_holds_no_full_logits[True]",
    "tests/test_fused_ce.py::test_adapted_head_falls_back_to_the_interceptor",
    "tests/test_nnx.py::test_twins_same_outputs_gradients_merges[dora]",
    "tests/test_nnx.py::test_adalora_under_nnx_optimizer_matches_linen",
    # command line: LoRA, QLoRA, full, generate, merge, errors stay in the default run
    "tests/test_cli.py::test_finetune_full_param_methods_save_params[galore]",
    "tests/test_cli.py::test_finetune_full_param_methods_save_params[lisa]",
    "tests/test_cli.py::test_compare_prints_table",
    "tests/test_cli.py::test_finetune_adapter_methods[adalora]",
    "tests/test_cli.py::test_finetune_adapter_methods[dora]",
    "tests/test_cli_errors.py::test_sigkill_after_a_save_then_resume",
    "tests/test_cli_gemma.py::test_merge_orbax_and_hf_give_the_adapted_logits",
    "tests/test_cli_gemma.py::test_sigint_then_resume_gives_the_uninterrupted_losses",
    "tests/test_cli_gemma.py::test_adapter_methods[adalora]",
    "tests/test_cli_gemma.py::test_adapter_methods[qlora]",
    # second parametrizations of checks whose first one runs by default
    "tests/test_lora.py::test_mixed_modules_match_float64_oracle[lora]",
    "tests/test_qlora.py::test_qlora_matches_lora_on_dequantized_base[scanned-False]",
    "tests/test_qlora.py::test_qlora_matches_lora_on_dequantized_base[scanned-True]",
    "tests/test_training.py::test_lora_training_on_shakespeare[False-dora]",
    "tests/test_training.py::test_lora_training_on_shakespeare[True-lora]",
    "tests/test_lisa_grad.py::test_scanned_llama_active_gradients",
    "tests/test_adalora.py::test_resized_adapters_give_the_masked_outputs",
    # 2026-12-01, second pass (the default run was still ~17 min with the ones above): each
    # repeats a default test's path on another layout, method or model
    "tests/test_training.py::test_lora_training_on_shakespeare[False-lora]",  # CLI LoRA runs train on it
    "tests/test_pretrained.py::TestSmolLM2::test_scanned_logits_match_unrolled",  # test_llama, tiny
    "tests/test_qlora.py::test_qlora_train_step_compiles_once_and_learns[scanned]",
    "tests/test_ops.py::test_custom_twin_matches_builtin[dora-einsum]",
    "tests/test_cli_gemma.py::test_non_finite_loss_stops_and_keeps_the_last_good_adapter",  # the shared loop: test_cli_errors
    "tests/test_nnx_mixed.py::test_mixed_batch_equals_linen_twin[dora]",
    "tests/test_llama.py::test_remat_gives_the_same_logits_and_gradients[scanned]",
    "tests/test_lisa_grad.py::test_training_equals_mask_lisa_step_for_step_without_retrace[stacked-keep-False]",
    "tests/test_lisa_grad.py::test_training_equals_mask_lisa_step_for_step_without_retrace[unrolled-reset-False]",
    "tests/test_lisa.py::test_frozen_layers_get_exactly_zero_and_active_match_inner[reset-unrolled]",
    "tests/test_nnx.py::test_peft_optimizers_under_nnx_optimizer_match_linen[lisa]",
    "tests/test_multitask.py::test_mixed_batch_rows_equal_each_adapter_alone[True]",
    # third pass (a fresh clone's default run was 14 min 57 s): second variants again
    "tests/test_bench_methods.py::test_quick_gemma_block_runs_the_cli_model_and_keeps_smollm2",
    "tests/test_nnx_mixed.py::test_mixed_batch_custom_nnx_module_equals_custom_linen_twin",
    "tests/test_nnx_mixed.py::test_mixed_batch_equals_linen_twin[lora]",  # rows test has the twin
    "tests/test_ops.py::test_mixed_batch_custom_and_dense_general_match_single_runs",
    "tests/test_ops.py::test_custom_twin_matches_builtin[qlora-einsum]",
    "tests/test_ops.py::test_custom_twin_matches_builtin[dora-dot_general]",
    "tests/test_gemma3_adapters.py::test_lora_trains_the_adapters_only[False]",
    "tests/test_qlora.py::test_quantized_base_runs_as_its_dequantized_weights[scanned]",
    "tests/test_cli.py::test_finetune_adapter_methods[loraplus]",
    "tests/test_lisa_grad.py::test_active_gradients_equal_full_gradients_at_active_slots[False-stacked]",
    # the 8-device subprocess suite (tests/test_sharding_mesh.py, slow) covers this at scale
    "tests/test_sharding.py::test_lora_step_under_sharding_matches_single_device",
    # fourth pass (852 default tests, 855 s on a fresh clone): the heaviest second checks
    "tests/test_qlora.py::test_qlora_matches_lora_on_dequantized_base[unrolled-True]",  # [False] stays
    "tests/test_qlora.py::test_qlora_step_does_not_keep_the_dequantized_weights",  # 30-layer plan
    "tests/test_merging.py::test_combine_adapters_matches_peft_add_weighted_adapter",  # oracles stay
    "tests/test_cli.py::test_adapter_that_does_not_fit_the_model",  # import_peft's own tests stay
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    if item.nodeid in SLOW_IN_DEFAULT_RUN:
      item.add_marker(pytest.mark.slow)
