"""The public API: top-level re-exports, __all__, and light imports of the transforms."""

import inspect
import os
import subprocess
import sys

import pytest

import fu_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRANSFORMS = ("ascent", "class_pruning", "distill", "ewc", "labels", "losses", "masking", "tree")
# What the experiment runner needs and a library user should not pay for.
HEAVY = (
  "orbax",
  "tensorflow_datasets",
  "tensorflow",
  "tensorboardX",
  "sklearn",
  "matplotlib",
  "ml_collections",
)


def _imported_after(code):
  probe = (
    f'import sys; {code}; print(sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r})))'
  )
  out = subprocess.run(
    [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
  )
  return out.stdout.strip()


def test_import_fu_jax_imports_no_jax():
  # Submodules load on first access, so `import fu_jax` (e.g. for fu_jax.data) stays cheap.
  out = subprocess.run(
    [sys.executable, "-c", 'import sys, fu_jax; print("jax" in sys.modules)'],
    capture_output=True,
    text=True,
    check=True,
    cwd=ROOT,
  )
  assert out.stdout.strip() == "False"


def test_transforms_import_only_the_light_dependencies():
  code = "; ".join(f"import fu_jax.{m}" for m in TRANSFORMS) + "; fu_jax.masked_update"
  assert _imported_after(code) == "[]"


@pytest.mark.parametrize("module", TRANSFORMS)
def test_all_names_exist_and_are_documented(module):
  mod = getattr(fu_jax, module)
  assert mod.__all__, module
  for name in mod.__all__:
    obj = getattr(mod, name)
    if inspect.isfunction(obj) or inspect.isclass(obj):
      assert obj.__doc__, f"fu_jax.{module}.{name} has no docstring"


def test_top_level_reexports_are_the_module_objects():
  for name, module in fu_jax._EXPORTS.items():
    assert getattr(fu_jax, name) is getattr(getattr(fu_jax, module), name)
  assert set(fu_jax._EXPORTS) <= set(fu_jax.__all__) and set(fu_jax.__all__) <= set(dir(fu_jax))
  with pytest.raises(AttributeError, match="no attribute"):
    fu_jax.not_a_transform  # noqa: B018


def test_ewc_help_is_short_and_has_an_example():
  doc = fu_jax.ewc.__doc__
  assert ">>>" in doc and "add_ewc_gradient" in doc
  assert len(doc.splitlines()) <= 60
