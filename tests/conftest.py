"""Keeps the default run under 15 minutes on 2 cores.

The tests below each took 20-60 s in the default run (2026-12-01, 2 cores:
851 tests in 23 min, over the 15-minute budget) and each repeats what a cheaper default test already
covers (another parametrization, another method through the same path, the
same check on one more model). They run with ``-m slow``, with everything
else that is long.
"""

import pytest

SLOW_IN_DEFAULT_RUN = {
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
    # the 8-device subprocess suite (tests/test_sharding_mesh.py, slow) covers this at scale
    "tests/test_sharding.py::test_lora_step_under_sharding_matches_single_device",
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    if item.nodeid in SLOW_IN_DEFAULT_RUN:
      item.add_marker(pytest.mark.slow)
