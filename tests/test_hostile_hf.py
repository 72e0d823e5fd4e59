"""Hostile and malformed Hugging Face PEFT directories: one clear error, no hang, no write."""

import copy
import json
import signal

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

import peft_jax as pj
from peft_jax.checkpoint import export_peft, import_peft
from hostile_helpers import snapshot

CONFIG = pj.LoRAConfig(rank=2, alpha=4.0, target_modules=("q_proj",))
ADAPTERS = {"model": {f"layers_{i}": {"self_attn": {"q_proj": {
    "lora_a": jnp.full((8, 2), i + 1.0), "lora_b": jnp.ones((2, 8))}}} for i in range(2)}}
SCANNED_BASE = {"model": {"layers": {"self_attn": {"q_proj": {"kernel": jnp.zeros((2, 8, 8))}}}}}
UNROLLED_BASE = {"model": {f"layers_{i}": {"self_attn": {"q_proj": {
    "kernel": jnp.zeros((8, 8))}}} for i in range(2)}}


@pytest.fixture
def hf_dir(tmp_path):
  export_peft(tmp_path / "hf", ADAPTERS, CONFIG)
  return tmp_path / "hf"


def _edit_config(hf_dir, edit):
  path = hf_dir / "adapter_config.json"
  config = json.loads(path.read_text())
  edit(config)
  path.write_text(json.dumps(config))


def expect_refused(root, match, **kwargs):
  before = snapshot(root.parent)
  with pytest.raises(ValueError, match=match):
    import_peft(root, **kwargs)
  assert snapshot(root.parent) == before


CONFIG_LIES = [
    (lambda c: c.update(r="8"), "r\\W"), (lambda c: c.update(r=0), "r\\W"),
    (lambda c: c.update(lora_alpha=float("inf")), "lora_alpha"),
    (lambda c: c.update(lora_alpha="16"), "lora_alpha"),
    (lambda c: c.update(lora_dropout=2.0), "lora_dropout"),
    (lambda c: c.update(use_dora="false"), "use_dora"),
    (lambda c: c.update(alpha_pattern={"(a+)+b": 2}), "alpha_pattern.*module names"),
    (lambda c: c.update(alpha_pattern={"q_proj": "x"}), "alpha_pattern"),
    (lambda c: c.update(alpha_pattern=[1]), "alpha_pattern"),
    (lambda c: c.update(target_modules=[1, 2]), "target_modules"),
    (lambda c: c.update(peft_type=["LORA"]), "peft_type"),
    (lambda c: c.clear() or c.update(x=1) or None, None),  # a bare config: defaults
]


@pytest.mark.parametrize("lie,match", CONFIG_LIES)
def test_malformed_adapter_config_names_file_field_value(hf_dir, lie, match):
  _edit_config(hf_dir, lie)
  if match is None:
    adapters, config = import_peft(hf_dir)
    assert config.rank == 8
    return
  expect_refused(hf_dir, f"adapter_config.json: field .{{0,2}}{match}")


@pytest.mark.parametrize("text", ["{", "[1, 2]", "\xff\xfe", "[" * 100000, "null"])
def test_unparsable_adapter_config(hf_dir, text):
  (hf_dir / "adapter_config.json").write_bytes(text.encode("latin-1"))
  expect_refused(hf_dir, "adapter_config.json")


def test_a_regex_alpha_pattern_never_runs(hf_dir):
  """(a+)+b against a 40-character name took over 60 s when compiled; now it is refused."""
  _edit_config(hf_dir, lambda c: c.update(alpha_pattern={"(a+)+b": 2, "a" * 40: 3}))
  expect_refused(hf_dir, "module names")


def test_literal_alpha_pattern_keys_match_exact_names_and_suffixes(hf_dir):
  _edit_config(hf_dir, lambda c: c.update(alpha_pattern={"model.layers.1.self_attn.q_proj": 9,
                                                         "layers.0.self_attn.q_proj": 5}))
  _, config = import_peft(hf_dir)
  assert config.alpha_for("model/layers_0/self_attn/q_proj") == 5.0
  assert config.alpha_for("model/layers_1/self_attn/q_proj") == 9.0


@pytest.mark.parametrize("tensors,match", [
    (None, "not a readable safetensors"),
    ({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
      np.ones((2, 8), np.int32)}, "must be floats"),
    ({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
      np.ones((2, 8, 1), np.float32)}, "2-D"),
    ({"base_model.model.x.lora_A.weight": np.ones((2, 8), np.float32)}, "lora_B"),
    ({"evil": np.ones((2, 2), np.float32)}, "does not start"),
])
def test_malformed_safetensors(hf_dir, tensors, match):
  path = hf_dir / "adapter_model.safetensors"
  if tensors is None:
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": garbage}")
  else:
    save_file(tensors, str(path))
  expect_refused(hf_dir, match)


def test_huge_layer_index_with_scanned_is_an_error_not_a_hang(hf_dir):
  path = hf_dir / "adapter_model.safetensors"
  tensors = load_file(str(path))
  renamed = {k.replace("layers.1.", "layers.99999999999."): v for k, v in tensors.items()}
  save_file(renamed, str(path))
  expect_refused(hf_dir, "Cannot stack", scanned=True)


def test_import_checks_adapters_against_the_base(hf_dir):
  adapters, _ = import_peft(hf_dir, base_params=UNROLLED_BASE)
  assert adapters["model"]["layers_1"]["self_attn"]["q_proj"]["lora_a"][0, 0] == 2.0
  stacked, _ = import_peft(hf_dir, scanned=True, base_params=SCANNED_BASE)
  assert stacked["model"]["layers"]["self_attn"]["q_proj"]["lora_a"].shape == (2, 8, 2)
  # Unrolled adapters on a scanned base would do nothing: refused, naming the modules.
  expect_refused(hf_dir, "(?s)layers_0/self_attn/q_proj: no kernel.*scanned=True",
                 base_params=SCANNED_BASE)
  small = {"model": {f"layers_{i}": {"self_attn": {"q_proj": {
      "kernel": jnp.zeros((4, 8))}}} for i in range(2)}}
  expect_refused(hf_dir, "do not fit", base_params=small)


def test_combine_names_adapters_that_would_do_nothing():
  adapters, _ = ADAPTERS, None
  with pytest.raises(ValueError, match="layers_0/self_attn/q_proj.*no kernel"):
    pj.combine(SCANNED_BASE, adapters)
  wrong = {"model": {"layers_0": {"self_attn": {"q_proj": {
      "lora_a": jnp.ones((8, 2)), "lora_b": jnp.ones((2, 4))}}}}}
  with pytest.raises(ValueError, match="do not fit its kernel"):
    pj.combine(UNROLLED_BASE, wrong)
  assert pj.combine(UNROLLED_BASE, ADAPTERS)["model"]["layers_0"]["self_attn"]["q_proj"]


def test_export_replaces_only_its_own_files_whole(hf_dir):
  (hf_dir / "README.md").write_text("mine")
  export_peft(hf_dir, ADAPTERS, CONFIG.replace(alpha=8.0))
  assert sorted(p.name for p in hf_dir.iterdir()) == [
      "README.md", "adapter_config.json", "adapter_model.safetensors"]
  assert (hf_dir / "README.md").read_text() == "mine"
  assert import_peft(hf_dir)[1].alpha == 8.0


# -- property test: random adapter_config.json ----------------------------------------
_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=3),
    max_leaves=8)
_FIELDS = ["r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "alpha_pattern",
           "rank_pattern", "target_modules", "peft_type", "init_lora_weights", "bias",
           "layers_to_transform", "modules_to_save", "anything"]


class _Hang(Exception):
  pass


def _alarm(*_):
  raise _Hang()


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(_FIELDS), _VALUES, max_size=3))
def test_random_adapter_config_is_a_clean_error_or_a_correct_load(tmp_path_factory, changes):
  root = tmp_path_factory.mktemp("hf")
  export_peft(root / "hf", ADAPTERS, CONFIG)
  _edit_config(root / "hf", lambda c: c.update(copy.deepcopy(changes)))
  before = snapshot(root)
  old = signal.signal(signal.SIGALRM, _alarm)
  signal.alarm(30)  # a hang guard, not a timing assertion
  try:
    adapters, config = import_peft(root / "hf")
  except ValueError:
    adapters = None
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)
  assert snapshot(root) == before
  if adapters is not None:
    for i in range(2):
      np.testing.assert_array_equal(
          adapters["model"][f"layers_{i}"]["self_attn"]["q_proj"]["lora_a"], i + 1.0)
