"""Every key a run reads, with defaults; dataset configs import this and override.

The runner's sections (data, fl, model, unlearn, backdoor, mia, eval) are here; each
registered method's section (its `base.Section`: fu_jax/methods/) is added after them.

Not meant to be run directly: use digits.py, fashion_mnist.py, mnist.py, cifar10.py,
svhn.py or celeba.py.
"""

import ml_collections

from fu_jax import methods


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.method = "fedavg"  # set by --method
  c.checkpoint_every = 5  # rounds between orbax checkpoints (the last round always)
  c.eval_every = 5  # rounds between test evaluations (the last round always)

  c.data = ml_collections.ConfigDict()
  c.data.source = "digits"  # digits | idx:<dir> | tfds:<name> | npz:<file>
  c.data.data_dir = ""  # TFDS data dir ("" = TFDS default)
  c.data.train_size = 0  # seeded class-stratified subsample of the training set (0 = all)
  c.data.num_clients = 10
  c.data.partition = "iid"  # iid | dirichlet (per class) | client_dirichlet (per client) | shards
  c.data.alpha = 0.5  # Dirichlet concentration (dirichlet, client_dirichlet)
  c.data.classes_per_client = 2  # shards: classes per client (1 = one class per user)
  c.data.min_size = 10  # dirichlet, client_dirichlet: minimum examples per client
  c.data.size_sigma = 0.0  # client_dirichlet: log-normal spread of client sizes (0 = equal)
  c.data.test_size = 0  # a seeded random subset of the test set (0 = all)
  c.data.seed = -1  # split, partition and forgotten samples (-1 = c.seed); an
  #                              audit's model bank varies c.seed with this fixed

  c.fl = ml_collections.ConfigDict()
  c.fl.rounds = 20
  c.fl.local_epochs = 1
  c.fl.batch_size = 32
  c.fl.client_lr = 0.05
  c.fl.client_momentum = 0.0
  c.fl.server_lr = 1.0  # optax.sgd(server_lr) on the mean delta: 1.0 = FedAvg
  c.fl.clients_per_round = 1.0  # fraction in (0, 1] or a whole count
  c.fl.runner = "auto"  # auto | vmap | loop | shard
  c.fl.chunk_size = 0  # clients per vmapped call (0 = all sampled)

  c.model = ml_collections.ConfigDict()
  c.model.name = "cnn"

  c.unlearn = ml_collections.ConfigDict()
  c.unlearn.kind = "class"  # class | client_class | client | samples
  c.unlearn.forget_class = 0
  c.unlearn.also_classes = ()  # more classes forgotten at once (parallel requests)
  c.unlearn.forget_client = 0  # samples: -1 = a fraction of every client's samples
  c.unlearn.forget_fraction = 0.0  # samples: fraction of the client's samples (random)
  c.unlearn.forget_indices = ""  # samples: .npy of training-set positions instead
  # Server-held calibration split (images no client trains on; fu_jax.calibration's targets):
  # drawn outside data.train_size's subsample, or carved off the training set when
  # train_size is 0 (that changes the trained model, and forget_indices then count the images
  # left). 0 = none.
  c.unlearn.calibration_size = 0

  c.backdoor = ml_collections.ConfigDict()
  c.backdoor.enabled = False  # plant a trigger in the data to forget, labels flipped
  c.backdoor.size = 2  # trigger patch side in pixels
  c.backdoor.shift = 1  # planted label = (y + shift) % num_classes (when target < 0)
  # >= 0: every planted label is this class (BadNets' all-to-one attack; FedAF flips to one
  # class), instead of the per-class shift (all-to-all), which is harder to learn
  c.backdoor.target = -1

  c.mia = ml_collections.ConfigDict()
  c.mia.enabled = True  # membership inference on the forgotten samples
  c.mia.shadows = 4  # shadow models for the shadow attacker (0 = skip it)
  c.mia.shadow_epochs = 20  # epochs each shadow model trains on its half of the pool
  c.mia.shadow_pool = 2000  # test rows (even positions) the shadow models draw from

  # Evaluation extras (after the final evaluation; not counted in unlearn_seconds).
  c.eval = ml_collections.ConfigDict()
  c.eval.relearn_steps = 0  # budget of central fine-tuning steps on the forgotten data
  #                                for relearn_steps_to_recover (0 = off)
  c.eval.relearn_retained = 0.0  # retained samples mixed in per forgotten sample (scored on
  #                                the forgotten ones; class requests need it, BUILD.md)

  # Each registered method's own section (defaults and what each key means live in its
  # module); defaults written as fl.<key> follow that key unless set themselves.
  for section in methods.SECTIONS.values():
    if section.name in c:
      raise ValueError(f"method section {section.name!r} would replace the config's own key")
    c[section.name] = section.defaults(c.fl)
  return c
