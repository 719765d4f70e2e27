"""The paper's CIFAR setup (2509.18001 §5.1), shared by the table configs.

Batch 128, SGD with momentum 0.9, learning rate 0.1 with cosine decay, weight
decay 5e-4, random crop (4-pixel padding) and horizontal flip; SAM and RW-SAM
for 200 epochs, SGD for 400; ``ρ = 0.05`` on CIFAR-10 and 0.1 on CIFAR-100;
RW-SAM's ``λ = 0.5``. The paper's ``σ`` values were lost in the text we have,
so RW-SAM calibrates ``σ`` on the initial model, as the paper does
(``"sigma": "calibrate"``, see :func:`experiments.train.calibrate_sigma`).
"""

from typing import Any

from experiments import config as config_lib

RHO = {"cifar10": 0.05, "cifar100": 0.1}
EPOCHS = {"sgd": 400}
DEFAULT_EPOCHS = 200
LAM = 0.5


def options(optimizer: str, **extra: Any) -> dict[str, Any]:
  """The variant's options: λ and a calibrated σ for RW-SAM and RW-ASAM."""
  if optimizer in ("rw_sam", "rw_asam"):
    return {"lam": LAM, "sigma": "calibrate", **extra}
  return dict(extra)


def cifar_config(
  dataset: str, model: str, optimizer: str, **overrides: Any
) -> config_lib.TrainConfig:
  """One run of the paper's CIFAR setup; ``overrides`` replace fields."""
  option_overrides = overrides.pop("options", {})
  config = config_lib.TrainConfig(
    dataset=dataset,
    model=model,
    optimizer=config_lib.OptimizerConfig(
      name=optimizer,
      learning_rate=0.1,
      momentum=0.9,
      weight_decay=5e-4,
      rho=RHO[dataset],
      options=options(optimizer, **option_overrides),
    ),
    epochs=EPOCHS.get(optimizer, DEFAULT_EPOCHS),
    batch_size=128,
    eval_batch_size=500,
    augment=True,
    checkpoint_every=5,
  )
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


def parse_row(
  row: str | None, fields: tuple[str, ...], table: str, default: str
) -> list[str]:
  """Splits ``"a,b,c"`` into ``len(fields)`` parts, with a clear error."""
  parts = (row or default).split(",")
  if len(parts) != len(fields):
    raise ValueError(f"{table}: a row is {','.join(fields)}, got {row!r}.")
  return parts
