"""Table 5: RW-SAM's temperature λ, CIFAR-100, ResNet-18.

Rows ``λ``: ``table5:0.25`` ... ``table5:2``. The paper: λ = 0.25 / 0.5 / 1 / 2
gives 79.09 / 79.31 / 79.12 / 79.03 (SAM 78.90, SGD 78.91).
"""

from experiments import config as config_lib
from experiments.configs import _paper

LAMBDAS = ("0.25", "0.5", "1", "2")


def rows() -> list[str]:
  return list(LAMBDAS)


def get_config(row: str | None = None) -> config_lib.TrainConfig:
  lam = row or "0.5"
  if lam not in LAMBDAS:
    raise ValueError(f"table5: unknown row {row!r}; rows: {rows()}.")
  return _paper.cifar_config(
    "cifar100", "resnet18", "rw_sam", options={"lam": float(lam)}
  )
