"""Channel-explanation unlearning (channel_de / channel_ce / channel_de_random) and CDP.

End to end on digits with the 2-conv CNN (pretrained once per module into a shared
workdir), plus exact checks of the packed exchange and the perturbation labels.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import caches, validation
from experiments import task as task_lib
from experiments.configs import digits
from fu_jax import checkpoint, fl, masking
from fu_jax import tree as tu
from fu_jax.methods import channel
from tests import pretrain_cache


def small_config(method, **overrides):
  """4 FedAvg rounds over 5 digits clients with the CNN; no membership inference."""
  c = digits.get_config()
  c.method = method
  c.fl.rounds, c.data.num_clients, c.checkpoint_every, c.eval_every = 4, 5, 100, 100
  c.model.name = "cnn"
  c.model.features = (16, 32)  # half the default widths: same layers, faster
  c.mia.enabled = False
  c.update_from_flattened_dict(overrides)
  return c


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("channel"))


def _run(workdir, method, **overrides):
  cfg = small_config(method, **overrides)
  return cfg, pretrain_cache.run(cfg, workdir)


def _restore(workdir, cfg, phase, template):
  """The final state the method's phase checkpointed (= what run() evaluated)."""
  ckpt = checkpoint.Checkpointer(
    os.path.join(workdir, cfg.method, "ckpt", phase), caches.config_dict(cfg)
  )
  state, step, _ = ckpt.restore_or(template)
  ckpt.close()
  assert step > 0
  return state


def _trained(workdir, cfg):
  task = task_lib.build_task(cfg)
  return task, caches.pretrained(task, workdir, "fedavg")[0].params


def _selection(res, params):
  by_path = dict(masking.channel_layers(params))
  out = {}
  for name, idx in res["selected"].items():
    path = tuple(name.split("/"))
    m = np.zeros(by_path[path], bool)
    m[idx] = True
    out[path] = m
  return out


def _assert_forgot(res):
  orig = res["original"]
  assert orig["forget_acc"] > 0.8
  assert res["forget_acc"] <= 0.1 < orig["forget_acc"] - 0.6
  assert res["retain_acc"] >= orig["retain_acc"] - 0.05


def _assert_only_selected_changed(trained, out, pmask):
  moved = 0
  for t, o, m in zip(jax.tree.leaves(trained), jax.tree.leaves(out), jax.tree.leaves(pmask)):
    t, o, m = np.asarray(t), np.asarray(o), np.asarray(m)
    # Bit-identical outside the selection (compare the raw bits, so -0.0 != +0.0).
    np.testing.assert_array_equal(t.view(np.uint32)[~m], o.view(np.uint32)[~m])
    moved += int(np.sum(t[m] != o[m]))
  assert moved > 0


@pytest.mark.slow
def test_channel_de_end_to_end(workdir):
  cfg, res = _run(workdir, "channel_de")
  _assert_forgot(res)
  task, trained = _trained(workdir, cfg)
  cmasks = _selection(res, trained)
  # ceil(0.2 C) channels of every conv/dense layer (the classifier included).
  for path, c in masking.channel_layers(trained):
    assert cmasks[path].sum() == masking.num_selected(0.2, c)
  assert res["selected_channels"] == sum(int(m.sum()) for m in cmasks.values())
  # Communication: each of the 5 clients sends and receives one packed selection per round.
  per = masking.selected_num_bytes(cmasks, trained)
  assert res["upload_bytes_per_client_round"] == per
  assert res["rounds"] == res["finetune_epochs"] == cfg.channel.epochs
  assert res["bytes_up"] == res["bytes_down"] == cfg.channel.epochs * 5 * per
  model_bytes = tu.tree_num_bytes(trained)
  assert res["bytes_up"] / res["rounds"] < 5 * model_bytes  # less than one full round
  assert 0.15 < res["upload_fraction_of_model"] < 0.3  # about delta of a full update
  # Examples: |I| for the effects plus every valid row (retained + perturbation) per round.
  n = int(np.sum(np.asarray(task.clients.valid)))
  assert res["examples"] == res["effect_samples"] + cfg.channel.epochs * n
  assert res["perturbation_examples"] == int(np.sum(np.asarray(task.forget)))
  # Fine-tuning moved only the selected channels: everything else is bit-identical.
  server = _restore(
    workdir, cfg, "channel_de", fl.server_init(trained, optax.sgd(cfg.fl.server_lr))
  )
  _assert_only_selected_changed(trained, server.params, channel.param_mask(cmasks, trained))


@pytest.mark.slow
def test_channel_ce_end_to_end(workdir):
  cfg, res = _run(workdir, "channel_ce", **{"channel.server_samples": 400})
  _assert_forgot(res)
  assert res["bytes_up"] == res["bytes_down"] == 0
  assert res["server_samples"] == 400
  assert res["server_retain_examples"] + res["perturbation_examples"] == 400
  assert res["examples"] == res["effect_samples"] + cfg.channel.epochs * 400
  _, trained = _trained(workdir, cfg)
  cmasks = _selection(res, trained)
  out = _restore(workdir, cfg, "channel_ce", trained)
  _assert_only_selected_changed(trained, out, channel.param_mask(cmasks, trained))


@pytest.mark.slow
def test_channel_de_random_same_counts(workdir):
  cfg, res = _run(workdir, "channel_de_random")
  _, trained = _trained(workdir, cfg)
  rnd = _selection(res, trained)
  for path, c in masking.channel_layers(trained):
    assert rnd[path].sum() == masking.num_selected(0.2, c)
  assert res["effect_samples"] == 0
  assert res["retain_acc"] >= res["original"]["retain_acc"] - 0.1
  assert res["bytes_up"] > 0


@pytest.mark.slow
def test_cdp_end_to_end(workdir):
  # A step budget above one epoch's steps (~17 at 258 retained images, batch 16): 2 epochs.
  cfg, res = _run(workdir, "cdp", **{"cdp.min_steps": 30})
  _assert_forgot(res)
  assert res["rounds"] == cfg.cdp.finetune_rounds
  task, trained = _trained(workdir, cfg)
  retained = np.asarray(task.retain_valid).sum(axis=1)
  epochs = -(-cfg.cdp.min_steps // -(-int(retained.min()) // cfg.fl.batch_size))
  assert epochs == 2 and res["finetune_epochs_per_round"] == epochs
  assert res["examples"] == res["stat_examples"] + cfg.cdp.finetune_rounds * epochs * retained.sum()
  # Statistics upload: per client K x C floats per conv layer plus K counts.
  convs = [c for p, c in masking.channel_layers(trained) if trained[p[0]]["kernel"].ndim == 4]
  assert res["stat_bytes_up"] == 5 * 4 * (10 * sum(convs) + 10)
  model_bytes = tu.tree_num_bytes(trained)
  assert res["bytes_up"] == res["stat_bytes_up"] + cfg.cdp.finetune_rounds * 5 * model_bytes
  # Every client downloads the trained model for its statistics, then each fine-tune round.
  assert res["bytes_down"] == (1 + cfg.cdp.finetune_rounds) * 5 * model_bytes
  # Pruned channels (conv layers only) are still exactly zero after fine-tuning.
  assert set(res["pruned"]) == {"Conv_0", "Conv_1"}
  server = _restore(
    workdir, cfg, "cdp_finetune", fl.server_init(trained, optax.sgd(cfg.fl.server_lr))
  )
  for name, idx in res["pruned"].items():
    assert len(idx) == masking.num_selected(cfg.cdp.sparsity, trained[name]["bias"].shape[0])
    assert not np.any(np.asarray(server.params[name]["kernel"])[..., idx])
    assert not np.any(np.asarray(server.params[name]["bias"])[idx])


@pytest.mark.parametrize("method", ["channel_de", "channel_ce", "channel_de_random", "cdp"])
@pytest.mark.parametrize("kind", ["client_class", "client"])
def test_refuses_non_class_requests(method, kind):
  with pytest.raises(validation.ConfigError, match=f"cannot serve unlearn.kind='{kind}'"):
    validation.validate(small_config(method, **{"unlearn.kind": kind}), method)


@pytest.mark.parametrize(
  "key, value",
  [
    ("channel.delta", 0.0),
    ("channel.delta", 1.5),
    ("channel.epochs", 0),
    ("channel.effect_metric", "auc"),
    ("channel.layers", "dense"),
  ],
)
def test_bad_settings_name_the_key(key, value):
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    channel.validate(small_config("channel_de", **{key: value}))


def test_perturbation_labels():
  k, classes = 10, (3, 7)
  rng = np.random.default_rng(0)
  y = rng.integers(0, k, size=(4, 50)).astype(np.int32)
  forget = np.isin(y, classes)
  index = np.arange(200).reshape(4, 50)
  key = jax.random.key(1)
  out = np.asarray(channel.perturbation_labels(key, y, index, forget, classes, k))
  np.testing.assert_array_equal(out[~forget], y[~forget])
  assert not np.isin(out[forget], classes).any()  # wrong, and never another forgotten class
  # Determined by the dataset index, not the position: shuffled rows get the same labels.
  perm = rng.permutation(50)
  out2 = np.asarray(
    channel.perturbation_labels(key, y[:, perm], index[:, perm], forget[:, perm], classes, k)
  )
  np.testing.assert_array_equal(out2, out[:, perm])
  # Roughly uniform over the 8 kept classes.
  many = np.asarray(
    channel.perturbation_labels(
      key, np.full(8000, 3), np.arange(8000), np.ones(8000, bool), (3,), k
    )
  )
  counts = np.bincount(many, minlength=k)
  assert counts[3] == 0 and counts[[0, 1, 2, 4, 5, 6, 7, 8, 9]].min() > 800


@pytest.mark.slow
def test_packed_exchange_matches_fedavg():
  rng = np.random.default_rng(0)
  f32 = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  params = {
    "Conv_0": {"kernel": f32(3, 3, 2, 6), "bias": f32(6)},
    "Dense_0": {"kernel": f32(24, 5), "bias": f32(5)},
  }
  cmasks = {
    ("Conv_0",): np.array([0, 1, 0, 0, 1, 1], bool),
    ("Dense_0",): np.array([0, 0, 1, 0, 0], bool),
  }
  pmask = channel.param_mask(cmasks, params)
  server_opt = optax.sgd(1.0)
  server = fl.server_init(params, server_opt)
  upload, aggregate, nbytes = channel.packed_exchange(cmasks, params, server_opt)
  assert nbytes == masking.selected_num_bytes(cmasks, params)
  assert nbytes == 4 * (3 * (18 + 1 + 1) + (24 + 1 + 1))
  w = jnp.asarray([3.0, 1.0, 0.0])
  deltas = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=(3,) + p.shape), jnp.float32), params)
  masked = jax.tree.map(lambda d, m: jnp.where(m[None], d, 0.0), deltas, pmask)
  clients = jax.tree.map(lambda p, d: p[None] + d, params, masked)
  got = aggregate(server, upload(clients, params), w)
  ref = fl.server_apply(server, fl.aggregate(params, clients, w), server_opt)
  for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(ref.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  # Whatever a client changed outside the selection never reaches the server.
  clients = jax.tree.map(lambda p, d: p[None] + d, params, deltas)
  got = aggregate(server, upload(clients, params), w)
  for a, b, m in zip(jax.tree.leaves(got.params), jax.tree.leaves(params), jax.tree.leaves(pmask)):
    np.testing.assert_array_equal(np.asarray(a)[~np.asarray(m)], np.asarray(b)[~np.asarray(m)])
