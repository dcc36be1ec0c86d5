"""A client's local computation (`LocalProgram`) and the plain SGD one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

from fu_jax import losses


class Batch(NamedTuple):
  """One mini-batch of a client: x and y are pytrees with a leading batch axis."""

  x: Any
  y: Any
  mask: Any  # bool [B]


class LocalProgram(NamedTuple):
  """A client's local computation.

  init(server_params, extra, key) -> state      extra: per-client pytree (masks, anchors...)
  step(state, batch, key) -> (state, metrics)   metrics: dict of scalars (batch means)
  finish(state) -> params                       what the client sends back

  Optionally a second step taken on a static schedule (both or neither given): on local
  step i (= epoch * steps_per_epoch + s, a Python int) the runners call `scheduled_step`
  where schedule(i) is True; its state and metrics have the same structure as `step`'s.
  The choice is made on the host, not by lax.cond: XLA:CPU runs a conv network's gradient
  ~19x slower inside a conditional branch (measured, CNN batch 64), so a costly occasional
  step (e.g. QuickDrop's distillation) under lax.cond would make every step slow.
  """

  init: Callable
  step: Callable
  finish: Callable
  scheduled_step: Callable | None = None
  schedule: Callable[[int], bool] | None = None


def is_scheduled(program: LocalProgram, i: int) -> bool:
  """Whether `program` takes its scheduled step on local step i (see LocalProgram)."""
  return program.scheduled_step is not None and bool(program.schedule(i))


def step_at(program: LocalProgram, i: int) -> Callable:
  """The step function `program` takes on local step i."""
  return program.scheduled_step if is_scheduled(program, i) else program.step


class TrainState(NamedTuple):
  params: Any
  opt_state: Any


def sgd_program(
  apply_fn, optimizer: optax.GradientTransformation, *, loss_fn=None, opt_init=None
) -> LocalProgram:
  """Mini-batch training of `loss_fn(params, batch) -> scalar` (default masked CE).

  opt_init(params, extra) -> opt_state lets per-client transform state (channel masks,
  EWC anchors and Fisher values) come from the client's `extra`.
  """
  if loss_fn is None:

    def loss_fn(params, batch):
      return losses.masked_ce(apply_fn(params, batch.x), batch.y, batch.mask)

  if opt_init is None:
    opt_init = lambda params, extra: optimizer.init(params)

  def init(server_params, extra, key):
    del key
    return TrainState(server_params, opt_init(server_params, extra))

  def step(state, batch, key):
    del key
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return TrainState(optax.apply_updates(state.params, updates), opt_state), {"loss": loss}

  return LocalProgram(init, step, lambda state: state.params)
