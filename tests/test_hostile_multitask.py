"""Adapter names are folder names, validated in one place; load_named checks like restore."""

import jax.numpy as jnp
import pytest

import peft_jax as pj
from peft_jax import multitask
from peft_jax.checkpoint.untrusted import check_name
from hostile_helpers import snapshot

CONFIG = pj.LoRAConfig(rank=2, target_modules=("m",))
ADAPTERS = {"m": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 3))}}
BAD_NAMES = ["a/b", "a\\b", "a\x00b", "..", ".", "", ".hidden", "tab\tname", "/abs",
             "x" * 300, 3, None, b"task", ("a",)]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused_before_any_write(tmp_path, name):
  (tmp_path / "lib").mkdir()
  multitask.save_named(tmp_path / "lib", "good", ADAPTERS, CONFIG)
  before = snapshot(tmp_path)
  with pytest.raises(ValueError, match="name"):
    multitask.save_named(tmp_path / "lib", name, ADAPTERS, CONFIG)
  with pytest.raises(ValueError, match="name"):
    multitask.load_named(tmp_path / "lib", name)
  assert snapshot(tmp_path) == before
  assert multitask.saved_names(tmp_path / "lib") == ["good"]


@pytest.mark.parametrize("name", ["task-1", "summarise_fr", "T5 small", "日本語"])
def test_good_names_round_trip(tmp_path, name):
  assert check_name(name) == name
  multitask.save_named(tmp_path, name, ADAPTERS, CONFIG)
  assert multitask.saved_names(tmp_path) == [name]
  adapters, config = multitask.load_named(tmp_path, name)
  assert config == CONFIG and adapters["m"]["lora_a"].shape == (4, 2)


def test_load_named_checks_the_adapters_against_the_base(tmp_path):
  multitask.save_named(tmp_path, "task", ADAPTERS, CONFIG)
  with pytest.raises(ValueError, match="m: no kernel"):
    multitask.load_named(tmp_path, "task", base_params={"other": {"kernel": jnp.zeros((4, 3))}})
  library = {"task": multitask.load_named(tmp_path, "task",
                                          base_params={"m": {"kernel": jnp.zeros((4, 3))}})}
  with pytest.raises(ValueError, match="no kernel"):
    multitask.with_adapter({"other": {"kernel": jnp.zeros((4, 3))}}, library, "task")


def test_every_guarantee_in_the_readme_names_existing_tests():
  import pathlib
  import re
  root = pathlib.Path(__file__).parents[1]
  readme = (root / "README.md").read_text()
  section = readme.split("## Guarantees", 1)[1].split("\n## ", 1)[0]
  cited = set(re.findall(r"`(test_\w+)`", section))
  defined = {m for path in (root / "tests").glob("test_*.py")
             for m in re.findall(r"^def (test_\w+)", path.read_text(), flags=re.M)}
  assert cited and not cited - defined, sorted(cited - defined)
  bullets = [b for b in section.split("\n* ")[1:]]
  assert all(re.search(r"`test_\w+`", b) for b in bullets), "every guarantee names a test"
