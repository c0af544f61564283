"""BUILD (Starlark, which parses as Python) must name every source and test."""

from __future__ import annotations

import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _build_strings() -> set[str]:
  tree = ast.parse((ROOT / "BUILD").read_text(), filename="BUILD")
  return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def _sources() -> list[str]:
  patterns = ["fastpersist_jax/**/*.py", "ext/*.cc", "ext/*.h", "tests/*.py", "examples/*.py"]
  return sorted({str(p.relative_to(ROOT)) for pat in patterns for p in ROOT.glob(pat)})


def test_build_parses_and_names_every_source():
  named = _build_strings()
  missing = [s for s in _sources() if s not in named]
  assert not missing, f"BUILD does not mention: {missing}"


def test_build_names_only_existing_files():
  suffixes = (".py", ".cc", ".h")
  stale = [s for s in _build_strings()
           if s.endswith(suffixes) and "/" in s and not (ROOT / s).exists()]
  assert not stale, f"BUILD names files that do not exist: {stale}"


def test_every_test_file_is_a_py_test():
  tree = ast.parse((ROOT / "BUILD").read_text())
  listed = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ListComp):
      for gen in node.generators:
        if isinstance(gen.iter, ast.List):
          listed |= {e.value for e in gen.iter.elts if isinstance(e, ast.Constant)}
  tests = {str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")}
  assert tests <= listed, f"tests without a py_test target: {sorted(tests - listed)}"


if __name__ == "__main__":  # Bazel py_test runs the file itself
  sys.exit(pytest.main([__file__, *sys.argv[1:]]))
