"""Layer outputs: every conv/dense layer's activations for a batch (sown intermediates)."""

from collections.abc import Sequence

from fu_jax.masking._layers import Path, resolve_layers


def _intermediate_layers(inter, prefix, out):
  """(path, output) for every submodule __call__ in insertion (= call) order, depth first."""
  for k, v in inter.items():
    if k == "__call__":
      if prefix:
        out.append((prefix, v))
    elif hasattr(v, "items"):
      _intermediate_layers(v, prefix + (k,), out)


def layer_outputs(module, params, x, *, layers: Sequence[Path] | None = None) -> dict:
  """Outputs (pre-activation) of the conv/dense layers, via flax capture_intermediates.

  Runs module.apply({'params': params}, x, capture_intermediates=True,
  mutable=['intermediates']) and picks the `__call__` output of each submodule whose path
  is a layer path. Returns a dict path -> array in call order (a jax.jit output re-sorts
  dict keys). A layer called more than once (weight sharing) is rejected.
  """
  _, state = module.apply(
    {"params": params}, x, capture_intermediates=True, mutable=["intermediates"]
  )
  wanted = set(p for p, _ in resolve_layers(params, layers))
  found = []
  _intermediate_layers(state["intermediates"], (), found)
  out = {}
  for path, outs in found:
    if path in wanted:
      if len(outs) != 1:
        raise ValueError(
          f"layer {path!r} was called {len(outs)} times; layer_outputs needs one call per layer"
        )
      out[path] = outs[0]
  missing = wanted - set(out)
  if missing:
    raise ValueError(
      f"no captured output for layers {sorted(missing)}: the module holding "
      "the kernel must be a submodule whose __call__ returns the layer output"
    )
  return out
