"""Runs the GCSAM authors' optimizer on the fixed MLP; saves trajectories.

The authors' code is one script, ``cifar10_gcsam_resnet50.py`` of
Mohamed-Hassan22/GCSAM (the repository the paper's README calls official;
commit 835c2b49ca3b, the file's last change). Its top level imports
pyhessian, TensorFlow and Keras and downloads CIFAR-10, so this driver
executes only its optimizer section, unchanged: the source from
``def centralized_gradient`` up to its ``**Model Loading**`` string line
(``centralized_gradient`` and the ``GCSAM`` class).

Problem: the 20-32-32-10 tanh MLP and the ten batches of
``tests/data/authors_trajectories.npz``, float32, with the weights held in
PyTorch's ``nn.Linear`` layout (``[out, in]``, so GC's mean over every axis
but the first is one mean per output unit, as for the authors' ResNet-50),
``torch.nn.CrossEntropyLoss()`` and ``torch.optim.SGD(lr=0.1,
momentum=0.9)`` as the base (the script uses Adam; the base is any
``torch.optim`` class), ``rho=0.05``, driven as the script's training loop
(``backward``, ``first_step(zero_grad=True)``, ``backward`` at the
perturbed point, ``second_step(zero_grad=True)``). Saves the parameters
after each step, in the ``x @ W + b`` layout ``[w1, b1, w2, b2, w3, b3]``
flattened, as ``gcsam`` in /tmp/authors/gcsam/gcsam_authors.npz. Run::

  cd /work/.mirror/Mohamed-Hassan22+GCSAM/repo
  git show 835c2b49ca3b:cifar10_gcsam_resnet50.py \
    > /tmp/authors/gcsam/src/cifar10_gcsam_resnet50.py
  python3 -m venv /tmp/authors/venv
  /tmp/authors/venv/bin/pip install torch numpy      # torch 2.14.1, CPU
  /tmp/authors/venv/bin/python tests/data/gcsam_authors_record.py
  cp /tmp/authors/gcsam/gcsam_authors.npz tests/data/
"""

import pathlib

import numpy as np
import torch

torch.set_default_dtype(torch.float32)
torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)
SOURCE = pathlib.Path("/tmp/authors/gcsam/src/cifar10_gcsam_resnet50.py")
OUT = pathlib.Path("/tmp/authors/gcsam/gcsam_authors.npz")
PROBLEM = pathlib.Path(__file__).resolve().parent / "authors_trajectories.npz"


def authors_optimizer():
  """``GCSAM`` from the authors' script, its optimizer section executed."""
  text = SOURCE.read_text()
  start = text.index("def centralized_gradient")
  end = text.index('"""**Model Loading**"""')
  namespace = {"__name__": "gcsam_authors"}
  exec(compile(text[start:end], str(SOURCE), "exec"), namespace)
  return namespace["GCSAM"]


class MLP(torch.nn.Module):
  """``tanh(x W1ᵀ + b1)`` ...: weights ``[out, in]`` as ``nn.Linear``'s."""

  def __init__(self, params):
    super().__init__()
    self.weights = torch.nn.ParameterList(
      [torch.nn.Parameter(torch.tensor(w.T.copy())) for w in params[0::2]]
    )
    self.biases = torch.nn.ParameterList(
      [torch.nn.Parameter(torch.tensor(b.copy())) for b in params[1::2]]
    )

  def forward(self, x):
    for i, (w, b) in enumerate(zip(self.weights, self.biases)):
      x = x @ w.T + b
      if i < len(self.weights) - 1:
        x = torch.tanh(x)
    return x

  def flat(self):
    leaves = []
    for w, b in zip(self.weights, self.biases):
      leaves += [w.detach().numpy().T.ravel(), b.detach().numpy().ravel()]
    return np.concatenate(leaves).copy()


def main():
  data = np.load(PROBLEM)
  params = [data[f"param_{i}"] for i in range(6)]
  model = MLP(params)
  gcsam = authors_optimizer()
  optimizer = gcsam(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1,
                    momentum=0.9)  # fmt: skip
  criterion = torch.nn.CrossEntropyLoss()
  out = []
  for x, y in zip(data["xs"], data["ys"], strict=True):
    inputs, target = torch.tensor(x), torch.tensor(y)
    # The script's training loop body.
    loss = criterion(model(inputs), target)
    loss.backward()
    optimizer.first_step(zero_grad=True)
    criterion(model(inputs), target).backward()
    optimizer.second_step(zero_grad=True)
    out.append(model.flat())
  np.savez(OUT, gcsam=np.stack(out), torch_version=torch.__version__)
  print(f"wrote {OUT}: {np.stack(out).shape}, torch {torch.__version__}")


if __name__ == "__main__":
  main()
