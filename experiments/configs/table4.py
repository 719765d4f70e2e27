"""Table 4: label noise, CIFAR-10, ResNet-18, SGD/SAM/RW-SAM.

Rows ``RATE,OPTIMIZER``, e.g. ``table4:0.8,rw_sam``: that fraction of the
training labels replaced by another class (exactly; the same corrupted set for
every run); the test labels are clean. The paper, SGD / SAM / RW-SAM: 20%
87.54/90.01/90.34; 40% 83.66/86.40/86.87; 60% 76.64/78.79/81.52; 80%
46.53/37.69/53.17. The paper gives no separate schedule for this table; Table
1's is used (SGD 400 epochs, SAM and RW-SAM 200).
"""

import itertools

from experiments import config as config_lib
from experiments.configs import _paper

RATES = ("0.2", "0.4", "0.6", "0.8")
OPTIMIZERS = ("sgd", "sam", "rw_sam")


def rows() -> list[str]:
  return [",".join(row) for row in itertools.product(RATES, OPTIMIZERS)]


def get_config(row: str | None = None) -> config_lib.TrainConfig:
  rate, optimizer = _paper.parse_row(
    row, ("rate", "optimizer"), "table4", "0.8,rw_sam"
  )
  if rate not in RATES or optimizer not in OPTIMIZERS:
    raise ValueError(f"table4: unknown row {row!r}; rows: {rows()}.")
  return _paper.cifar_config(
    "cifar10", "resnet18", optimizer, label_noise=float(rate)
  )
