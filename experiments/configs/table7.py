"""Table 7: m-SAM against the micro-batch size m, with time per epoch.

CIFAR-100, ResNet-18, batch 128, 200 epochs; rows ``sam``, ``rw_sam``,
``m_sam,M`` and ``m_usam,M`` for ``M`` in 64, 32, 16, 8 (the paper's values
of m were lost in the text we have; halving m doubled the time of its
sequential loop: 26 → 50 → 92 → 175 s per epoch), and ``usam``. Every epoch's
time is in ``metrics.jsonl`` (``epoch_seconds``). The paper: SAM 78.90
(13.6 s), RW-SAM 79.31 (15.2 s), m-SAM 79.35 → 80.72 as m falls; m-USAM
79.16 → 80.66. Here m-SAM runs all micro-batches in one program
(``implementation="vmap"``, the GPU form), not in a sequential loop.
"""

from experiments import config as config_lib
from experiments.configs import _paper

MICRO_BATCH_SIZES = ("64", "32", "16", "8")


def rows() -> list[str]:
  return (
    ["sam", "usam", "rw_sam"]
    + [f"m_sam,{m}" for m in MICRO_BATCH_SIZES]
    + [f"m_usam,{m}" for m in MICRO_BATCH_SIZES]
  )


def get_config(row: str | None = None) -> config_lib.TrainConfig:
  row = row or "m_sam,16"
  if row not in rows():
    raise ValueError(f"table7: unknown row {row!r}; rows: {rows()}.")
  name, _, micro_batch_size = row.partition(",")
  if not micro_batch_size:
    return _paper.cifar_config("cifar100", "resnet18", name)
  options = {
    "micro_batch_size": int(micro_batch_size),
    "implementation": "vmap",
  }
  if name == "m_usam":
    options["normalize"] = False
  return _paper.cifar_config("cifar100", "resnet18", "m_sam", options=options)
