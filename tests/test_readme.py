"""The README's Python examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).parents[1] / "README.md"


def _python_blocks():
  return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
  assert _python_blocks()


def test_readme_examples_run_in_order():
  namespace = {}
  for index, block in enumerate(_python_blocks()):
    exec(compile(block, f"README.md[python block {index}]", "exec"), namespace)
