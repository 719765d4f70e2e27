"""Table 1: CIFAR-10/100 × ResNet-18/50/WRN-28-10 × SGD/SAM/RW-SAM.

Rows ``DATASET,MODEL,OPTIMIZER``, e.g. ``table1:cifar100,wrn28_10,rw_sam``.
The paper's test accuracy (mean of 3 seeds), SGD / SAM / RW-SAM:
ResNet-18 95.62/95.99/96.24 (C10), 78.91/78.90/79.31 (C100); ResNet-50
95.64/96.06/96.34, 79.55/80.31/80.83; WRN-28-10 96.47/96.91/97.11,
81.55/83.25/83.52.
"""

import itertools

from experiments import config as config_lib
from experiments.configs import _paper

DATASETS = ("cifar10", "cifar100")
MODELS = ("resnet18", "resnet50", "wrn28_10")
OPTIMIZERS = ("sgd", "sam", "rw_sam")


def rows() -> list[str]:
  return [
    ",".join(row) for row in itertools.product(DATASETS, MODELS, OPTIMIZERS)
  ]


def get_config(row: str | None = None) -> config_lib.TrainConfig:
  dataset, model, optimizer = _paper.parse_row(
    row, ("dataset", "model", "optimizer"), "table1", "cifar10,resnet18,sam"
  )
  if (
    dataset not in DATASETS
    or model not in MODELS
    or optimizer not in OPTIMIZERS
  ):
    raise ValueError(f"table1: unknown row {row!r}; rows: {rows()}.")
  return _paper.cifar_config(dataset, model, optimizer)
