"""Experiments for sam_optax: Flax NNX models, data, training and the paper's tables.

The main job, ``python -m experiments.compare``, trains SGD, SAM, m-SAM and
RW-SAM on MNIST-1D with label noise in a few minutes on a CPU;
``python -m experiments.train --config NAME`` runs one configuration of the
paper's tables (``experiments/configs``).
"""
