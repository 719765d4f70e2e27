"""Configurations: the MNIST-1D runs of the main job and the paper's tables.

A configuration is named ``TABLE`` or ``TABLE:ROW``: ``TABLE`` is a module of
this package with ``get_config(row)`` and ``rows()``; ``ROW`` picks one run of
the table (e.g. ``table1:cifar10,resnet18,rw_sam``; ``rows()`` lists them).
Seeds are not part of a row: override them (``--set seed=1``).

| table | what | rows |
|---|---|---|
| ``mnist1d`` | the main job's MNIST-1D runs (CPU scale) | one per optimizer |
| ``table1`` | CIFAR-10/100 × ResNet-18/50/WRN-28-10 × SGD/SAM/RW-SAM | 18 |
| ``table4`` | label noise 20–80 %, CIFAR-10, ResNet-18 | 12 |
| ``table5`` | RW-SAM's λ, CIFAR-100, ResNet-18 | 4 |
| ``table6`` | gradient-noise trace at the end, CIFAR-100, ResNet-18 | 3 |
| ``table7`` | m-SAM against m, with time per epoch, CIFAR-100, ResNet-18 | 6+ |
"""

import importlib

from experiments import config as config_lib

TABLES = ("mnist1d", "table1", "table4", "table5", "table6", "table7")


def _module(table: str):
  if table not in TABLES:
    raise ValueError(f"unknown configuration {table!r}; use one of {TABLES}.")
  return importlib.import_module(f"experiments.configs.{table}")


def get_config(spec: str) -> config_lib.TrainConfig:
  """The configuration ``TABLE`` or ``TABLE:ROW``."""
  table, _, row = spec.partition(":")
  return _module(table).get_config(row or None)


def rows(table: str) -> list[str]:
  """The full names (``TABLE:ROW``) of the rows of ``table``."""
  return [f"{table}:{row}" for row in _module(table).rows()]
