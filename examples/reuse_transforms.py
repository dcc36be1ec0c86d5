"""fu_jax's transforms on a plain Flax model, without federated learning.

Forget digit 0 of scikit-learn's digits: score every output channel by how much zeroing it
costs class-0 accuracy (Xu et al.), zero the top 20% per layer and fine-tune only those on
the other classes (masked_update), with an EWC penalty (diagonal Fisher of the retained
data at the trained model) keeping what the rest of the data taught.

  python3 examples/reuse_transforms.py

The data come from scikit-learn, which a plain `pip install .` does not install: without it
the example stops at once with one line naming the extra that brings it,
`pip install "fu_jax[experiments]"`.
"""

import sys

# What a plain `pip install .` lacks (scikit-learn) and the extra that brings it.
MISSING_SKLEARN = 'this example reads scikit-learn\'s digits: pip install "fu_jax[experiments]"'

try:  # first: without the data nothing below is worth importing
  from sklearn.datasets import load_digits
except ModuleNotFoundError as e:
  if (e.name or "").partition(".")[0] != "sklearn":
    raise
  sys.exit(MISSING_SKLEARN)

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fu_jax import ewc, losses, masking, models

FORGET = 0


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(nn.relu(nn.Dense(64)(x)))


def train(apply_fn, params, x, y, tx, steps, opt_state=None):
  """Full-batch training of the mean cross-entropy with the optax transform tx."""
  opt_state = tx.init(params) if opt_state is None else opt_state

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(lambda p: losses.masked_ce(apply_fn(p, x), y, jnp.ones(len(y))))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for _ in range(steps):
    params, opt_state = step(params, opt_state)
  return params


def accuracy(apply_fn, params, x, y):
  return float(jnp.mean(jnp.argmax(apply_fn(params, x), -1) == y))


def main(seed: int = 0, delta: float = 0.2, lam: float = 10.0):
  digits = load_digits()
  x, y = jnp.asarray(digits.data / 16.0, jnp.float32), jnp.asarray(digits.target)
  forget, retain = y == FORGET, y != FORGET
  model = MLP()
  apply_fn = models.logits_fn(model)  # (params, x) -> logits, the convention of every transform
  trained = train(
    apply_fn, model.init(jax.random.key(seed), x[:1])["params"], x, y, optax.adam(1e-2), 300
  )

  # 1. The channels that matter most for the class to forget (ties broken by the loss).
  effects = masking.channel_effects(apply_fn, trained, x[forget], y[forget], metric="both")
  mask = masking.top_delta_mask(effects, delta, trained)

  # 2. Zero them, then train only them on the retained data; EWC anchors at the trained model.
  fisher = ewc.fisher_diagonal(
    ewc.example_ce_loss(apply_fn),
    trained,
    x[retain],
    y[retain],
    jnp.ones(int(retain.sum()), bool),
    chunk_size=256,
  )
  tx = optax.chain(ewc.add_ewc_gradient(lam), optax.adam(1e-2), masking.masked_update())
  state = masking.set_mask(tx.init(trained), mask)
  state = ewc.set_ewc_state(state, ewc.ewc_state_diag(trained, fisher))
  unlearned = train(
    apply_fn, masking.zero_masked(trained, mask), x[retain], y[retain], tx, 100, state
  )

  report = {
    name: {
      "forget_acc": accuracy(apply_fn, p, x[forget], y[forget]),
      "retain_acc": accuracy(apply_fn, p, x[retain], y[retain]),
    }
    for name, p in (("trained", trained), ("unlearned", unlearned))
  }
  return trained, unlearned, mask, report


if __name__ == "__main__":
  _, _, _, report = main()
  for name, accs in report.items():
    print(f"{name:10s} forget_acc={accs['forget_acc']:.3f} retain_acc={accs['retain_acc']:.3f}")
