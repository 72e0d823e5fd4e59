"""Hostile and malformed Orbax checkpoints: they never call code, never write, never hang.

Each case gives one ValueError naming the file, leaves every file byte-identical
and leaves the last good checkpoint readable.
"""

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import peft_jax as pj
from peft_jax import checkpoint, multitask
from peft_jax.checkpoint import untrusted
from peft_jax.quant import nf4
from hostile_helpers import edit_json, snapshot

CONFIG = pj.LoRAConfig(rank=2, alpha=4.0, target_modules=("q", "v"), rank_pattern={"v": 1})
ADAPTERS = {"q": {"lora_a": jnp.arange(8.0).reshape(4, 2), "lora_b": jnp.ones((2, 3))},
            "v": {"lora_a": jnp.ones((4, 1)), "lora_b": jnp.full((1, 3), 0.5)}}
BASE = {"q": {"kernel": jnp.zeros((4, 3))}, "v": {"kernel": jnp.zeros((4, 3))}}


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def ckpt(tmp_path):
  path = checkpoint.save(tmp_path / "good", ADAPTERS, CONFIG)
  victim = tmp_path / "victim"
  victim.mkdir()
  (victim / "notes.txt").write_text("not a checkpoint")
  return tmp_path, path


@pytest.fixture(scope="module")
def nf4_params():
  kernel = jax.random.normal(jax.random.key(0), (64, 8))
  return {"dq": {"kernel": nf4.quantize_array(kernel)},
          "plain": {"kernel": nf4.quantize_array(kernel, nf4.NF4(double_quant=False))},
          "flat": {"kernel": nf4.quantize_array(kernel[:, :3], nf4.NF4(block_size=16))}}


def expect_refused(root, path, match, reader=None):
  """``reader(path)`` raises a ValueError matching ``match``; nothing under root changed."""
  before = snapshot(root)
  with pytest.raises(ValueError, match=match):
    (reader or checkpoint.restore)(path)
  assert snapshot(root) == before


# -- a checkpoint can never call code ----------------------------------------------------
@pytest.mark.parametrize("name", [
    "peft_jax.checkpoint.orbax.save_params", "peft_jax.cli.main.main", "os.system",
    "peft_jax.quant.nf4.NF4Array.__init__", "nf4 ", "NF4Array"])
def test_manifest_naming_a_callable_is_refused(ckpt, nf4_params, name):
  root, _ = ckpt
  path = checkpoint.save_params(root / "base", nf4_params)
  victim = str(root / "victim")
  for key in ("class", "type"):
    def edit(m):
      spec = m["quantized"]["dq/kernel"]
      spec.pop("class", None)
      spec[key] = name
      spec["static"] = {"directory": victim, "params": {}, "overwrite": True}
    edit_json(os.path.join(path, "manifest", "metadata"), edit)
    expect_refused(root, path, "not a leaf type|expected fields", checkpoint.restore_params)


def test_load_named_and_restore_share_the_checks(ckpt):
  root, _ = ckpt
  multitask.save_named(root / "lib", "task", ADAPTERS, CONFIG)
  edit_json(root / "lib" / "task" / "manifest" / "metadata",
            lambda m: m["quantized"].update({"q": {"class": "os.system", "static": {}}}))
  expect_refused(root, root / "lib", "not a leaf type",
                 lambda p: multitask.load_named(p, "task"))


NF4_LIES = [
    ("block_size", 32, "needs"), ("block_size", 48, "power of two"),
    ("block_size", True, "integer"), ("kernel_shape", {"tuple": [64, 16]}, "needs"),
    ("kernel_shape", {"tuple": [2**60, 8]}, "integer in"), ("in_ndim", 2, "needs"),
    ("in_ndim", 3, "integer in"),
    ("quant_type", "fp8", "one of"), ("quant_type", "fp4", None),
    ("dtype", {"dtype": "int32"}, "one of"), ("dtype", {"dtype": "object"}, "one of"),
    ("compute_dtype", {"dtype": "uint8"}, "one of"), ("kernel_shape", [], "empty"),
]


@pytest.mark.parametrize("field,value,match", NF4_LIES)
def test_every_nf4_static_field_is_checked(tmp_path, nf4_params, field, value, match):
  path = checkpoint.save_params(tmp_path / "base", nf4_params)
  edit_json(os.path.join(path, "manifest", "metadata"),
            lambda m: m["quantized"]["dq/kernel"]["static"].update({field: value}))
  if match is None:  # same shapes, other meaning: accepted, but visible in the leaf
    assert checkpoint.restore_params(path)["dq"]["kernel"].quant_type == value
    return
  expect_refused(tmp_path, path, f"manifest.*{match}", checkpoint.restore_params)


@pytest.mark.parametrize("names", [["codes"], ["codes", "absmax", "offset"], ["os"], None])
def test_nf4_array_list_is_checked(tmp_path, nf4_params, names):
  path = checkpoint.save_params(tmp_path / "base", nf4_params)
  edit_json(os.path.join(path, "manifest", "metadata"),
            lambda m: m["quantized"]["dq/kernel"].update({"arrays": names}))
  expect_refused(tmp_path, path, "arrays", checkpoint.restore_params)


def test_nf4_base_round_trips_exactly(tmp_path, nf4_params):
  restored = checkpoint.restore_params(checkpoint.save_params(tmp_path / "base", nf4_params))
  for name, leaf in nf4_params.items():
    got = restored[name]["kernel"]
    assert type(got) is nf4.NF4Array and got.kernel_shape == leaf["kernel"].kernel_shape
    np.testing.assert_array_equal(got.dequantize(), leaf["kernel"].dequantize())


# -- the manifest's array list, and checksums ------------------------------------------
ARRAY_LIES = [
    (lambda a: a["q/lora_a"].update(shape=[4, 3]), "cannot read|CRC|needs|expected"),
    (lambda a: a["q/lora_a"].update(dtype="bfloat16"), "cannot read|dtype|CRC"),
    (lambda a: a["q/lora_a"].update(dtype="object"), "one of"),
    (lambda a: a["q/lora_a"].update(crc32=[1]), "CRC-32"),
    (lambda a: a["q/lora_a"].update(crc32=[]), "CRC-32"),
    (lambda a: a.__delitem__("q/lora_a"), "differ from the manifest|cannot read"),
    (lambda a: a.update({"q/lora_a/x": a["q/lora_b"]}), "clash|cannot read"),
    (lambda a: a.update({"../../etc": a["q/lora_b"]}), "cannot read|differ"),
    (lambda a: a["q/lora_a"].update(shape=[2**40, 2**40]), "cannot read|CRC"),
]


@pytest.mark.parametrize("lie,match", ARRAY_LIES)
def test_array_list_is_checked(ckpt, lie, match):
  root, path = ckpt
  edit_json(os.path.join(path, "manifest", "metadata"), lambda m: lie(m["arrays"]))
  expect_refused(root, path, match)


_FLIPPER = textwrap.dedent("""
    import os, sys
    import numpy as np
    from peft_jax import checkpoint
    path, want = sys.argv[1], np.load(sys.argv[2])
    data = os.path.join(path, "adapters")
    files = [os.path.join(d, f) for d, _, fs in os.walk(data) for f in fs]
    for name in files:
      original = open(name, "rb").read()
      for offset in np.linspace(0, len(original) - 1, 6).astype(int):
        flipped = bytearray(original)
        flipped[offset] ^= 0x10
        open(name, "wb").write(bytes(flipped))
        try:
          got = np.asarray(checkpoint.restore(path)[0]["m"]["lora_a"])
          print("same" if np.array_equal(got, want) else f"WRONG {name} {offset}")
        except ValueError as error:
          print("error", str(error).splitlines()[0])
        open(name, "wb").write(original)
""")


def test_a_flipped_bit_in_any_data_file_is_an_error_or_harmless(tmp_path):
  lora_a = jnp.linspace(-1, 1, 64 * 1024).reshape(1024, 64)
  big = {"m": {"lora_a": lora_a, "lora_b": jnp.ones((64, 8))}}
  path = checkpoint.save(tmp_path / "c", big, pj.LoRAConfig(rank=64, target_modules=("m",)))
  np.save(tmp_path / "want.npy", np.asarray(lora_a))
  # A fresh process: an in-process read could be served from Orbax's cache.
  out = subprocess.run([sys.executable, "-c", _FLIPPER, path, str(tmp_path / "want.npy")],
                       capture_output=True, text=True, check=True, timeout=300).stdout
  lines = out.splitlines()
  assert lines and not [l for l in lines if l.startswith("WRONG")], out
  errors = [l for l in lines if l.startswith("error")]
  assert any("CRC-32" in l and os.path.join(path, "adapters") in l for l in errors), out
  assert_trees_equal(checkpoint.restore(path)[0], big)


# -- malformed manifests and configs: one ValueError naming file, field, value ----------
MANIFEST_LIES = [
    (lambda m: ["not", "a", "dict"], "expected a JSON object"),
    (lambda m: m.update(format_version="2"), "format_version"),
    (lambda m: m.update(format_version=10**30), "format_version"),
    (lambda m: m.update(format_version=99), "newer"),
    (lambda m: m.update(kind="params"), "holds 'params'"),
    (lambda m: m.update(wrapped="yes"), "wrapped"),
    (lambda m: m.update(arrays=[1, 2]), "arrays"),
    (lambda m: m.update(quantized={"q": 3}), "quantized"),
]
CONFIG_LIES = [
    (lambda c: c.update(rank="8"), "'rank'"),
    (lambda c: c.update(rank=2.5), "positive integer"),
    (lambda c: c.update(alpha=float("inf")), "'alpha'"),
    (lambda c: c.update(use_dora="yes"), "'use_dora'"),
    (lambda c: c.update(rank_pattern={"(a+)+b": 2}), "module names"),
    (lambda c: c.update(rank_pattern={"v[": 2}), "module names"),
    (lambda c: c.update(alpha_pattern={"x" * 5000: 2}), "module names"),
    (lambda c: c.update(rank_pattern=["v"]), "JSON object"),
    (lambda c: c.update(evil=1), "Unknown"),
    (lambda c: c.update(config_class="os.system"), "Unknown config class"),
    (lambda c: c.update(format_version=[1]), "format_version"),
    (lambda c: c.update(target_modules=[{"a": 1}]), "target_modules"),
]


@pytest.mark.parametrize("lie,match", MANIFEST_LIES)
def test_malformed_manifest(ckpt, lie, match):
  root, path = ckpt
  edit_json(os.path.join(path, "manifest", "metadata"), lie)
  expect_refused(root, path, match)


@pytest.mark.parametrize("lie,match", CONFIG_LIES)
def test_malformed_config(ckpt, lie, match):
  root, path = ckpt
  edit_json(os.path.join(path, "config", "metadata"), lie)
  expect_refused(root, path, f"config.*{match}")


def test_unparsable_json_names_the_item(ckpt):
  root, path = ckpt
  open(os.path.join(path, "manifest", "metadata"), "w").write("{" * 100000)
  expect_refused(root, path, "manifest: cannot read")


def test_regex_patterns_are_saved_as_exact_module_names(tmp_path):
  config = CONFIG.replace(rank_pattern={"[uv]": 1, "(a+)+b": 5})
  checkpoint.save(tmp_path / "c", ADAPTERS, config)
  stored = json.loads((tmp_path / "c" / "config" / "metadata").read_text())
  assert stored["rank_pattern"] == {"v": 1}
  adapters, restored = checkpoint.restore(tmp_path / "c", base_params=BASE)
  assert [restored.rank_for(m) for m in ("q", "v")] == [2, 1]


def test_literal_name_rules():
  assert untrusted.literal_name("model.layers.0.q_proj") == "model.layers.0.q_proj"
  assert untrusted.literal_name(r"model/layers\_0/q\-proj") == "model/layers_0/q-proj"
  for key in ("(a+)+b", ".*", r"\d", "a|b", "x{2}", "", 3, "a" * 2000):
    assert untrusted.literal_name(key) is None


# -- property test: any manifest or config gives a clean error or the right tree --------
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)


def _replace_at(tree, choices, value):
  """Replaces one node (picked by the ``choices`` integers) with ``value``."""
  node = tree
  for choice in choices:
    if not isinstance(node, (dict, list)) or not node:
      break
    keys = list(node) if isinstance(node, dict) else list(range(len(node)))
    key = keys[choice % len(keys)]
    if not isinstance(node[key], (dict, list)) or choice % 3 == 0:
      node[key] = value
      return tree
    node = node[key]
  return value if node is tree else tree


class _Hang(Exception):
  pass


def _alarm(*_):
  raise _Hang()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
  root = tmp_path_factory.mktemp("pristine")
  kernel = jax.random.normal(jax.random.key(0), (32, 4))
  checkpoint.save(root / "a", ADAPTERS, CONFIG)
  checkpoint.save_params(root / "p", {"d": {"kernel": nf4.quantize_array(
      kernel, nf4.NF4(block_size=16))}})
  return root


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(item=st.sampled_from(["a/manifest", "a/config", "p/manifest"]),
       choices=st.lists(st.integers(0, 50), max_size=5), value=_JSON)
def test_random_manifest_or_config_is_a_clean_error_or_a_correct_load(
    pristine, tmp_path_factory, item, choices, value):
  root = tmp_path_factory.mktemp("case")
  for name in ("a", "p"):
    shutil.copytree(pristine / name, root / name)
  edit_json(root / item / "metadata", lambda c: _replace_at(copy.deepcopy(c), choices, value))
  before = snapshot(root)
  kind, reader = (("a", checkpoint.restore) if item.startswith("a/")
                  else ("p", checkpoint.restore_params))
  old = signal.signal(signal.SIGALRM, _alarm)
  signal.alarm(30)  # a hang guard, not a timing assertion
  try:
    result = reader(root / kind)
  except ValueError:
    result = None
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)
  assert snapshot(root) == before
  if result is not None and kind == "a":  # "wrapped" may have been set: then nested once
    assert_trees_equal(result[0].get("params", result[0]), ADAPTERS)
  elif result is not None:
    want = checkpoint.restore_params(pristine / "p")["d"]["kernel"]
    got = result.get("params", result)["d"]["kernel"]
    if isinstance(got, dict):  # the manifest no longer marks it quantized: its raw arrays
      np.testing.assert_array_equal(got["codes"], want.codes)
      return
    assert got.kernel_shape == want.kernel_shape and got.block_size == want.block_size
    np.testing.assert_array_equal(got.codes, want.codes)


@pytest.mark.parametrize("field", ["type", "class"])
@pytest.mark.parametrize("value", [[], {}, 3, None, ["nf4"]])
def test_unhashable_or_odd_leaf_type_is_a_clean_error(pristine, tmp_path, field, value):
  """Found by the property test above: a list as a quantized leaf's type was a TypeError."""
  shutil.copytree(pristine / "p", tmp_path / "p")

  def edit(manifest):
    for spec in manifest["quantized"].values():
      spec.pop("type", None)
      spec[field] = value
    return manifest

  edit_json(tmp_path / "p" / "manifest" / "metadata", edit)
  with pytest.raises(ValueError, match="not a leaf type"):
    checkpoint.restore_params(tmp_path / "p")


def test_cli_generate_refuses_a_hostile_checkpoint_in_one_line(ckpt, capsys):
  from peft_jax.cli.main import main  # pylint: disable=import-outside-toplevel
  root, path = ckpt
  victim = str(root / "victim")
  edit_json(os.path.join(path, "manifest", "metadata"), lambda m: m["quantized"].update(
      {"q": {"class": "peft_jax.checkpoint.orbax.save_params",
             "static": {"directory": victim, "params": {}, "overwrite": True}}}))
  (root / "run").mkdir()
  (root / "run" / "summary.json").write_text("{not json")
  before = snapshot(root)
  for argv, message in [
      (["generate", "--adapter", path, "--model", "tiny", "--prompt", "x"], "not a leaf type"),
      (["generate", "--adapter", str(root / "run"), "--prompt", "x"],
       "summary.json: not readable")]:
    with pytest.raises(SystemExit) as exit_info:
      main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err, err
  assert snapshot(root) == before


def test_version_1_checkpoints_still_restore(tmp_path, nf4_params):
  """Format 1 named the class and stored no array list: its one class name still reads."""
  path = checkpoint.save_params(tmp_path / "base", nf4_params)

  def to_version_1(m):
    m["format_version"] = 1
    del m["arrays"]
    for spec in m["quantized"].values():
      spec["class"] = "peft_jax.quant.nf4.NF4Array"
      del spec["type"]
  edit_json(os.path.join(path, "manifest", "metadata"), to_version_1)
  restored = checkpoint.restore_params(path)
  np.testing.assert_array_equal(restored["dq"]["kernel"].dequantize(),
                                nf4_params["dq"]["kernel"].dequantize())
