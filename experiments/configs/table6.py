"""Table 6: the gradient-noise trace ``tr Σ`` at the end of training.

CIFAR-100, ResNet-18; rows ``sgd``, ``sam``, ``rw_sam``. After training,
``tr Σ`` is measured on 10 000 training examples (per-example gradients,
BatchNorm on running statistics; ``sam_optax.diagnostics.gradient_noise``)
and written to ``noise_trace.json``. The paper: SGD 572, SAM 198, RW-SAM 178.
"""

from experiments import config as config_lib
from experiments.configs import _paper

OPTIMIZERS = ("sgd", "sam", "rw_sam")
EXAMPLES = 10_000


def rows() -> list[str]:
  return list(OPTIMIZERS)


def get_config(row: str | None = None) -> config_lib.TrainConfig:
  optimizer = row or "rw_sam"
  if optimizer not in OPTIMIZERS:
    raise ValueError(f"table6: unknown row {row!r}; rows: {rows()}.")
  return _paper.cifar_config(
    "cifar100", "resnet18", optimizer, noise_trace_examples=EXAMPLES
  )
