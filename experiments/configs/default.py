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
  c.data.train_size = 0        # seeded class-stratified subsample of the training set (0 = all)
  c.data.num_clients = 10
  c.data.partition = "iid"     # iid | dirichlet (per class) | client_dirichlet (per client) | shards
  c.data.alpha = 0.5           # Dirichlet concentration (dirichlet, client_dirichlet)
  c.data.classes_per_client = 2  # shards: classes per client (1 = one class per user)
  c.data.min_size = 10         # dirichlet, client_dirichlet: minimum examples per client
  c.data.size_sigma = 0.0      # client_dirichlet: log-normal spread of client sizes (0 = equal)
  c.data.test_size = 0         # a seeded random subset of the test set (0 = all)
  c.data.seed = -1             # split, partition and forgotten samples (-1 = c.seed); an
  #                              audit's model bank varies c.seed with this fixed

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
  c.unlearn.kind = "class"     # class | client_class | client | samples
  c.unlearn.forget_class = 0
  c.unlearn.also_classes = ()  # more classes forgotten at once (parallel requests)
  c.unlearn.forget_client = 0  # samples: -1 = a fraction of every client's samples
  c.unlearn.forget_fraction = 0.0  # samples: fraction of the client's samples (random)
  c.unlearn.forget_indices = ""    # samples: .npy of training-set positions instead

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
  c.mia.shadow_pool = 2000     # test rows (even positions) the shadow models draw from

  # Channel-explanation unlearning (Xu et al.): channel_de, channel_ce, channel_de_random.
  c.channel = ml_collections.ConfigDict()
  c.channel.delta = 0.2          # fraction of output channels selected per layer (ceil)
  c.channel.epochs = 2           # fine-tune epochs: DE FedAvg rounds / CE passes (paper <= 4)
  c.channel.local_epochs = 0     # DE local epochs per round (0 = fl.local_epochs)
  c.channel.lr = 0.0             # fine-tune SGD lr (0 = fl.client_lr), momentum fl.client_momentum
  c.channel.batch_size = 0       # fine-tune batch size (0 = fl.batch_size)
  c.channel.effect_samples = 128  # server's batch I of forget samples for channel effects
  c.channel.effect_metric = "both"  # acc (paper) | loss | both (acc, ties broken by loss)
  c.channel.layers = "all"       # all (every conv/dense layer, paper) | conv
  c.channel.perturb = True       # add perturbation data (forget samples, random wrong labels)
  c.channel.server_samples = 1600  # CE: training examples the server holds (capped)

  # CDP, class-discriminative pruning (Wang et al. 2022).
  c.cdp = ml_collections.ConfigDict()
  c.cdp.sparsity = 0.3           # fraction of each conv layer's channels pruned per class
  c.cdp.finetune_rounds = 2      # FedAvg rounds on retained data after pruning
  c.cdp.stat_samples = 256       # examples per client for class activations (0 = all)
  c.cdp.coe = 0.0                # TF-IDF width balance (Wang et al.'s coe; 0 = none)

  # QuickDrop (Dhasade et al. 2023): FedAvg with integrated distillation, SGA + recovery.
  # Training keys (a change retrains the quickdrop model): scale .. artifacts.
  c.quickdrop = ml_collections.ConfigDict()
  c.quickdrop.scale = 0.01           # synthetic images per class = ceil(n_c * scale), >= 1
  c.quickdrop.images_per_class = 0   # fixed count per present class instead (0 = use scale)
  c.quickdrop.image_lr = 0.1         # SGD lr on the synthetic images (DC / QuickDrop)
  c.quickdrop.image_momentum = 0.5   # its momentum
  c.quickdrop.metric = "ours"        # gradient-matching distance: ours | mse | cos
  c.quickdrop.model_update = "real"  # real (reuse the real gradient, paper) | synthetic (official)
  c.quickdrop.grads = "per_example"  # per-class gradient algorithm: per_example | vmap | unroll
  c.quickdrop.distill_every = 0      # image step on local steps 0, k, 2k, ... (1 = every step;
  #                                    0 = once per round, at the first step: official schedule)
  c.quickdrop.chunk_size = 0         # images per chunk of the stored sets (0 = automatic,
  #                                    distill.synthetic_layout; a layout, not a hyperparameter)
  c.quickdrop.clip_images = False    # keep synthetic pixels within the real data's [min, max]
  c.quickdrop.artifacts = True       # write pretrain/<dir>/synthetic/client_<k>.{npz,png}
  # Unlearning keys.
  c.quickdrop.unlearn_epochs = 1     # SGA epochs on the distilled forget data
  c.quickdrop.unlearn_lr = 1.0       # SGA step size (with unlearn_normalize: L2 step length)
  c.quickdrop.unlearn_batch_size = 0  # SGA batch size (0 = fl.batch_size)
  c.quickdrop.unlearn_normalize = True  # ascend along g/||g||: unlearn_lr = step length
  c.quickdrop.recovery_rounds = 5    # FedAvg rounds on the distilled retained data
  c.quickdrop.recovery_epochs = 0    # local epochs per recovery round (0 = fl.local_epochs)
  c.quickdrop.recovery_lr = 0.0      # recovery lr (0 = fl.client_lr); momentum fl.client_momentum
  c.quickdrop.clip_norm = 1.0        # recovery: clip each client gradient to this norm (0 = off)
  c.quickdrop.finetune_rounds = 0    # FedAvg rounds on the real retained data afterwards
  c.quickdrop.sequence = ()          # classes forgotten one after another (must hold the request)

  # FedAF (Li et al. 2023, Federated Unlearning via Active Forgetting): fedaf and fedaf_c
  # (no EWC). fu_jax/methods/fedaf.py.
  c.fedaf = ml_collections.ConfigDict()
  c.fedaf.teachers = 10          # Q untrained Xavier teachers labelling the target data (paper 10)
  c.fedaf.label = "debias"       # new labels: uniform | random | teacher | debias (paper: debias)
  c.fedaf.debias_scope = "sample"  # debias weight w per sample | one w over the target set (batch)
  c.fedaf.lam = 10.0             # EWC strength lambda (paper 10); unused by fedaf_c
  c.fedaf.epochs = 1             # local epochs of the unlearning loss on the target data (paper 1)
  c.fedaf.min_steps = 10         # >= this many SGD steps per target client (epochs raised to
  #                                ceil(min_steps / steps per epoch)): forgetting that does not
  #                                depend on how many images a client holds (0 = epochs only).
  #                                10 = one epoch of full Fashion-MNIST's class-wide request
  #                                (600 images at batch 64), so lr 0.002 holds on digits and a
  #                                4,000-image subset (24 steps at lr 0.02 diverge on digits)
  c.fedaf.max_steps = 200        # forgetting rule: past min_steps, keep taking epochs (up to
  #                                this many steps for the smallest target client) until an
  #                                epoch in which at most stop_acc of a client's target samples
  #                                got their old label; the client then stops. Class requests
  #                                and backdoors only (retraining would not predict those
  #                                labels); 0 = off (min_steps / epochs alone)
  c.fedaf.stop_acc = 0.02        # the rule's tolerance (argmax = old label, before each step)
  c.fedaf.fisher = "diag"        # H: diag (empirical Fisher diagonal) | sketch (CountSketch S J)
  c.fedaf.sketch_width = 50      # t, rows of the CountSketch (memory t * d per client)
  c.fedaf.fisher_labels = "empirical"  # labels of the Fisher's gradients: empirical (held,
  #                                  paper) | model (sampled from p(.|x; theta*): true Fisher)
  c.fedaf.fisher_data = "local"  # Fisher over all local data (paper, Eq. 7-13) | retain (ablation)
  c.fedaf.fisher_samples = 1024  # local examples the Fisher is estimated from (0 = all)
  c.fedaf.fisher_chunk = 64      # examples per per-example-gradient call (memory chunk * d)
  c.fedaf.lr = 0.002             # unlearning SGD lr (0 = fl.client_lr); paper: MNIST 0.001
  c.fedaf.momentum = 0.0         # unlearning SGD momentum (paper: plain SGD)
  c.fedaf.batch_size = 0         # unlearning batch size (0 = fl.batch_size)
  c.fedaf.true_weight = 1.0      # weight of the -CE(f(x), y_old) term (paper 1)
  c.fedaf.max_old_loss = -1.0    # stop a client once batch CE(y_old) > it (0 = log K; < 0 never)
  c.fedaf.old_labels = "trained"  # y_old: trained (as held, backdoor flips incl.) | original
  c.fedaf.recovery_rounds = 0    # FedAvg rounds on retained data after the unlearned update

  # SGA baseline (Wu et al. 2022): bounded gradient ascent on the real forget data, then
  # recovery FedAvg rounds. fu_jax/methods/sga.py.
  c.sga = ml_collections.ConfigDict()
  c.sga.lr = 0.1                 # ascent step size
  c.sga.epochs = 5               # ascent epochs (max_loss usually ends the ascent earlier)
  c.sga.min_steps = 0            # epochs raised so each target client has >= this many steps
  c.sga.batch_size = 0           # ascent batch size (0 = fl.batch_size)
  c.sga.radius_frac = 0.33       # L2 ball around theta*: frac * ||theta_random - theta*|| (0 = none)
  c.sga.max_loss = 0.0           # stop once a batch CE exceeds it (0 = log K; < 0 = never)
  c.sga.old_labels = "trained"   # labels ascended: trained (backdoor flips incl.) | original
  c.sga.recovery_rounds = 1      # FedAvg rounds on retained data afterwards

  # FedEraser (Liu et al., IWQoS 2021): trainer and method `federaser`; client requests, and
  # class requests whose class one client alone holds. fu_jax/methods/federaser.py.
  # Training key (a change retrains the federaser model and its store): interval.
  c.federaser = ml_collections.ConfigDict()
  c.federaser.interval = 1       # Delta t: store rounds 0, Delta t, 2 Delta t, ... (1..fl.rounds)
  c.federaser.calib_ratio = 0.5  # calibration work / local training work (paper 0.5; with 1
  #                                local epoch: one pass over a random half of the data)
  c.federaser.combine = "client"  # per-client rescaled updates (paper) | mean (reference code)

  # FRR, rapid retraining (Liu et al., INFOCOM 2022): FedAvg rounds on the retained data
  # with a diagonal empirical-Fisher quasi-Newton local optimizer. fu_jax/methods/frr.py.
  c.frr = ml_collections.ConfigDict()
  c.frr.init = "trained"         # start from the trained model | scratch (a fresh init)
  c.frr.rounds = 5               # FedAvg rounds of rapid retraining
  c.frr.local_epochs = 0         # local epochs per round (0 = fl.local_epochs)
  c.frr.lr = 0.001               # eta (paper 0.001)
  c.frr.beta1 = 0.9              # momentum of the gradient (paper 0.9)
  c.frr.beta2 = 0.999            # momentum of the squared diagonal Fisher (paper 0.999)
  c.frr.eps = 1e-4               # damping added to the Fisher before dividing (not in the paper)

  # Evaluation extras (after the final evaluation; not counted in unlearn_seconds).
  c.eval = ml_collections.ConfigDict()
  c.eval.relearn_steps = 0       # budget of central fine-tuning steps on the forgotten data
  #                                for relearn_steps_to_recover (0 = off)
  return c
