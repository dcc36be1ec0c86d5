"""Every key a run reads, with defaults; dataset configs import this and override.

Not meant to be run directly: use digits.py, fashion_mnist.py, mnist.py, cifar10.py,
svhn.py or celeba.py.
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.method = "fedavg"          # set by --method
  c.checkpoint_every = 5       # rounds between orbax checkpoints (the last round always)
  c.eval_every = 5             # rounds between test evaluations (the last round always)

  c.data = ml_collections.ConfigDict()
  c.data.source = "digits"     # digits | idx:<dir> | tfds:<name> | npz:<file>
  c.data.data_dir = ""         # TFDS data dir ("" = TFDS default)
  c.data.num_clients = 10
  c.data.partition = "iid"     # iid | dirichlet | shards
  c.data.alpha = 0.5           # Dirichlet concentration
  c.data.classes_per_client = 2  # shards: classes per client (1 = one class per user)
  c.data.min_size = 10         # Dirichlet: minimum examples per client

  c.fl = ml_collections.ConfigDict()
  c.fl.rounds = 20
  c.fl.local_epochs = 1
  c.fl.batch_size = 32
  c.fl.client_lr = 0.05
  c.fl.client_momentum = 0.0
  c.fl.server_lr = 1.0         # optax.sgd(server_lr) on the mean delta: 1.0 = FedAvg
  c.fl.clients_per_round = 1.0  # fraction in (0, 1] or a whole count
  c.fl.runner = "auto"         # auto | vmap | loop | shard
  c.fl.chunk_size = 0          # clients per vmapped call (0 = all sampled)

  c.model = ml_collections.ConfigDict()
  c.model.name = "cnn"

  c.unlearn = ml_collections.ConfigDict()
  c.unlearn.kind = "class"     # class | client_class | client
  c.unlearn.forget_class = 0
  c.unlearn.also_classes = ()  # more classes forgotten at once (parallel requests)
  c.unlearn.forget_client = 0

  c.finetune = ml_collections.ConfigDict()
  c.finetune.rounds = 5

  c.backdoor = ml_collections.ConfigDict()
  c.backdoor.enabled = False   # plant a trigger in the data to forget, labels shifted
  c.backdoor.size = 2          # trigger patch side in pixels
  c.backdoor.shift = 1         # planted label = (y + shift) % num_classes

  c.mia = ml_collections.ConfigDict()
  c.mia.enabled = True         # membership inference on the forgotten samples
  c.mia.shadows = 4            # shadow models for the shadow attacker (0 = skip it)
  c.mia.shadow_epochs = 20     # epochs each shadow model trains on its half of the pool
  return c
