"""MNIST-1D with MNIST-1D's small CNN: the main job's runs, one per optimizer.

CPU scale: 4000 training signals, batch 128 (31 steps an epoch), SGD with
momentum 0.9, learning rate 0.1 with cosine decay, weight decay 5e-4, and
``ρ = 0.05``, as the paper's CIFAR runs; ``ρ = 0.5`` for ASAM and RW-ASAM
(their scaled perturbation is smaller; ``sam_optax.asam``'s default) and for
USAM (its perturbation ``ρ g`` shrinks with the gradient); ``ρ = 0.3`` for
Momentum-SAM (its official code's default). The main job
(``python -m experiments.compare``) adds label noise and sweeps m.

:data:`WIDE` is the wider CNN of the RW-SAM ablation
(``python -m experiments.rw_ablation``): ``--set 'model_options={"channels":
64}'`` on any row.
"""

from experiments import config as config_lib

OPTIONS = {
  "sgd": {},
  "sam": {},
  "usam": {},
  "m_sam": {"micro_batch_size": 16},
  "asam": {},
  "f_sam": {},
  "rw_sam": {"lam": 0.5},
  "rw_asam": {"lam": 0.5},
  "gsam": {},
  "wsam": {},
  "vasso": {},
  "look_sam": {},
  "momentum_sam": {},
}
RHO = {"asam": 0.5, "rw_asam": 0.5, "usam": 0.5, "momentum_sam": 0.3}
WIDE = {"channels": 64}
"""``model_options`` of the wider CNN: 64 channels instead of 25 (28k
parameters against 5.2k); with 30% label noise it fits every noisy training
label by the end of the main job's 100 epochs (SGD, SAM and RW-SAM alike),
where the default CNN fits about half of them."""


def rows() -> list[str]:
  return list(OPTIONS)


def get_config(row: str | None = None) -> config_lib.TrainConfig:
  name = row or "sgd"
  if name not in OPTIONS:
    raise ValueError(f"mnist1d: unknown row {name!r}; use one of {rows()}.")
  return config_lib.TrainConfig(
    dataset="mnist1d",
    model="cnn1d",
    optimizer=config_lib.OptimizerConfig(
      name=name,
      learning_rate=0.1,
      momentum=0.9,
      weight_decay=5e-4,
      rho=RHO.get(name, 0.05),
      options=dict(OPTIONS[name]),
    ),  # a copy: callers may edit theirs
    epochs=60,
    batch_size=128,
    checkpoint_every=10,
  )
