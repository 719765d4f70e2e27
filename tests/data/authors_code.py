"""Runs the authors' optimizer code on one fixed problem; saves trajectories.

Problem: a 20-32-32-10 tanh MLP (x @ W + b layout), fixed weights and
batches from numpy's default_rng(0), float32, SGD momentum 0.9 as the base,
10 steps. Saves /work/peer/authors_trajectories.npz (copied to tests/data/) with the problem and,
for each run, the flattened parameters [w1, b1, w2, b2, w3, b3] after every
step. Run: /work/venvs/variants-a-peer/bin/python /work/peer/run_peers.py
"""

import contextlib
import itertools
import sys
import threading
import types

import numpy as np
import torch

torch.set_default_dtype(torch.float32)
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)
SRC = "/work/peer/src"
STEPS, BATCH, DIMS = 10, 32, (20, 32, 32, 10)
LR, MOMENTUM = 0.1, 0.9


def problem():
  rng = np.random.default_rng(0)
  params = []
  for a, b in itertools.pairwise(DIMS):
    params.append((rng.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32))
    params.append((0.1 * rng.normal(size=(b,))).astype(np.float32))
  xs = rng.normal(size=(STEPS, BATCH, DIMS[0])).astype(np.float32)
  ys = rng.integers(0, DIMS[-1], size=(STEPS, BATCH)).astype(np.int64)
  return params, xs, ys


class MLP(torch.nn.Module):
  def __init__(self, params):
    super().__init__()
    names = ["w1", "b1", "w2", "b2", "w3", "b3"]
    for name, value in zip(names, params):
      self.register_parameter(
        name, torch.nn.Parameter(torch.tensor(value.copy()))
      )

  def forward(self, x):
    h = torch.tanh(x @ self.w1 + self.b1)
    h = torch.tanh(h @ self.w2 + self.b2)
    return h @ self.w3 + self.b3


def flat(model):
  return np.concatenate(
    [p.detach().numpy().ravel().copy() for p in model.parameters()]
  )


def batches():
  _, xs, ys = problem()
  return [(torch.tensor(x), torch.tensor(y)) for x, y in zip(xs, ys)]


ce = torch.nn.CrossEntropyLoss(reduction="none")


def run_esam(gamma):
  sys.path.insert(0, f"{SRC}/esam")
  from Esam import ESAM

  model = MLP(problem()[0])
  base = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
  optimizer = ESAM(model.parameters(), base, rho=0.05, beta=1.0, gamma=gamma)
  out = []
  for inputs, targets in batches():
    # As the official train.py's loop body.
    def defined_backward(loss):
      loss.backward()

    optimizer.paras = [inputs, targets, ce, model, defined_backward]
    optimizer.step()
    out.append(flat(model))
  return np.stack(out)


def run_lookbehind(k, alpha):
  sys.path.insert(0, f"{SRC}/lookbehind")
  from lookbehind import LookbehindSAM

  model = MLP(problem()[0])
  optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
  minimizer = LookbehindSAM(optimizer, model, rho=0.05, k_steps=k, alpha=alpha)
  out = []
  for inputs, targets in batches()[: STEPS // k]:
    for _ in range(k):  # as example_cifar.py: k steps on each batch
      ce(model(inputs), targets).mean().backward()
      minimizer.ascent_step()
      ce(model(inputs), targets).mean().backward()
      minimizer.descent_step()
      # The caller's weights are the fast ones between steps (p holds the
      # ascent point); after a cycle they are the interpolated ones.
      state = minimizer.state
      out.append(
        np.concatenate(
          [
            state[p]["cached_params"].numpy().ravel().copy()
            for p in model.parameters()
          ]
        )
      )
  return np.stack(out)


def run_wsam(decouple):
  sys.path.insert(0, f"{SRC}/wsam")
  from atorch.optimizers.wsam import WeightedSAM

  model = MLP(problem()[0])
  base = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
  optimizer = WeightedSAM(
    model, base, rho=0.05, gamma=0.9, decouple=decouple, max_norm=None
  )
  out = []
  for inputs, targets in batches():  # the README's two-step use
    ce(model(inputs), targets).mean().backward()
    optimizer.first_step(zero_grad=True)
    ce(model(inputs), targets).mean().backward()
    optimizer.second_step(zero_grad=True)
    out.append(flat(model))
  return np.stack(out)


def run_vasso(theta):
  sys.path.insert(0, f"{SRC}/vasso")
  from solver.vasso import VASSO

  model = MLP(problem()[0])
  base = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
  optimizer = VASSO(
    params=model.parameters(), base_optimizer=base, rho=0.05, theta=theta
  )
  out = []
  for images, targets in batches():  # as utils/engine.py's loop body

    def closure():
      loss = ce(model(images), targets).mean()
      loss.backward()

    loss = ce(model(images), targets).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step(closure)
    out.append(flat(model))
  return np.stack(out)


def run_sampa(og):
  """The official train.py's run(), its two Fabric ranks as two threads."""
  sys.path.insert(0, f"{SRC}/sampa")
  barrier = threading.Barrier(2)
  shared = {}
  records = []
  data = batches()

  class Fabric:
    def __init__(self, devices, strategy, accelerator):
      self.global_rank = int(threading.current_thread().name[-1])

    def launch(self):
      pass

    def setup_dataloaders(self, *loaders, use_distributed_sampler):
      return loaders

    def setup(self, model, optimizer):
      if self.global_rank == 0:
        optimizer.register_step_post_hook(
          lambda opt, args, kwargs: records.append(flat(model))
        )
      return model, optimizer

    def no_backward_sync(self, model, enabled):
      return contextlib.nullcontext()

    def backward(self, loss):
      loss.backward()

    def all_reduce(self, tensor, reduce_op):
      assert reduce_op == "sum"
      shared[self.global_rank] = tensor.clone()
      barrier.wait()
      total = shared[0] + shared[1]
      barrier.wait()
      return total

  lightning = types.ModuleType("lightning")
  fabric_module = types.ModuleType("lightning.fabric")
  fabric_module.Fabric = Fabric
  fabric_module.seed_everything = lambda seed: None
  lightning.fabric = fabric_module
  sys.modules["lightning"] = lightning
  sys.modules["lightning.fabric"] = fabric_module
  dataset = types.SimpleNamespace(train=data, valid=data[:1], test=data[:1])
  sys.modules["get_dataset"] = types.SimpleNamespace(
    get_dataset=lambda args: dataset
  )
  sys.modules["get_model"] = types.SimpleNamespace(
    get_model=lambda args: MLP(problem()[0])
  )
  import train

  args = types.SimpleNamespace(
    epochs=1,
    lr=LR,
    rho=0.1,
    og=og,
    weight_decay=0.0,
    momentum=MOMENTUM,
    seed=0,
    save_path="/tmp/sampa_peer_save",
  )
  threads = [
    threading.Thread(target=train.run, args=(args,), name=f"rank{r}")
    for r in (0, 1)
  ]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return np.stack(records)


if __name__ == "__main__":
  params, xs, ys = problem()
  results = {
    "esam_gamma_0.5": run_esam(0.5),
    "esam_gamma_1": run_esam(1.0),
    "lookbehind_k2_alpha_0.5": run_lookbehind(2, 0.5),
    "wsam_decoupled": run_wsam(True),
    "wsam_coupled": run_wsam(False),
    "vasso_theta_0.9": run_vasso(0.9),
    "sampa_og_0.2": run_sampa(0.2),
  }
  for name, value in results.items():
    print(name, value.shape, float(np.linalg.norm(value[-1])))
  np.savez(
    "/work/peer/authors_trajectories.npz",
    **{f"param_{i}": p for i, p in enumerate(params)},
    xs=xs,
    ys=ys,
    **results,
  )
