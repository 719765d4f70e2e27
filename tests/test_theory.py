"""The theory of ALGORITHMS.md, checked through the library's own transforms.

Per-example quadratic losses ``ℓ_i(w) = ½ (w−a_i)ᵀ H_i (w−a_i)`` with
symmetric ``H_i`` that differ between examples. Then, exactly:

* one USAM step on ``S`` returns ``∇L_S(w + ρ g_S) = g_S + ρ H_S g_S
  = ∇[L_S + (ρ/2)‖g_S‖²]`` (the gradient is affine, ``H_S`` symmetric);
* over ``S`` uniform among the size-``m`` subsets of the ``n`` examples,
  ``E_S‖g_S‖² = ‖∇L‖² + c_m tr Σ`` at every ``w``, with
  ``c_m = (n−m)/(m(n−1))`` (a finite-population identity); and because it
  holds at every ``w``, the gradients agree too:
  ``E_S usam_S(w) = ∇[L + (ρ/2)(‖∇L‖² + c_m tr Σ)](w)`` (Thm 3.5).

The ``H_i`` must differ: with a shared ``H``, ``tr Σ = mean_i ‖H(a_i − ā)‖²``
does not depend on ``w`` and the noise term has no gradient, so the identity
would hold trivially. Averaging over all subsets equals averaging over the
micro-batches of all random partitions (each is a uniform ``m``-subset); the
subsets are enumerated here.
"""

import itertools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

import sam_optax
from sam_optax import diagnostics

from _problems import flatten

RHO = 0.3
NUM_EXAMPLES = 6


def quadratic_loss(params, batch):
  """ℓ_i(w) = ½ (w−a_i)ᵀ H_i (w−a_i) over a two-leaf pytree."""
  w = jnp.concatenate([params["u"], params["v"]])
  diff = w[None, :] - batch["target"]
  return 0.5 * jnp.einsum("bi,bij,bj->b", diff, batch["hessian"], diff)


def problem(seed=0, dims=(3, 2)):
  rng = np.random.default_rng(seed)
  dim = sum(dims)
  roots = rng.normal(size=(NUM_EXAMPLES, dim, dim))
  hessians = roots @ np.swapaxes(roots, 1, 2) / dim + 0.2 * np.eye(dim)
  data = {
    "target": jnp.asarray(rng.normal(size=(NUM_EXAMPLES, dim)), jnp.float32),
    "hessian": jnp.asarray(hessians, jnp.float32),
  }
  params = {
    "u": jnp.asarray(rng.normal(size=dims[0]), jnp.float32),
    "v": jnp.asarray(rng.normal(size=dims[1]), jnp.float32),
  }
  return params, data


def average_over_subsets(step, params, data, m):
  """``mean_S step(params, S)`` over every size-``m`` subset ``S``."""
  subsets = jnp.asarray(list(itertools.combinations(range(NUM_EXAMPLES), m)))
  take = lambda index: jax.tree.map(lambda x: x[index], data)
  outputs = jax.jit(jax.vmap(lambda index: step(params, take(index))))(subsets)
  return jax.tree.map(lambda x: jnp.mean(x, axis=0), outputs)


def usam_step(params, batch):
  tx = sam_optax.usam(RHO)
  updates, _ = tx.update(
    None, tx.init(params), params, loss_fn=quadratic_loss, batch=batch
  )
  return updates


def regularized_gradient(params, data, coefficient):
  """``∇[L + (ρ/2)(‖∇L‖² + c tr Σ)]``, with ``tr Σ`` from the diagnostics."""

  def objective(p):
    noise = diagnostics.gradient_noise(quadratic_loss, p, data)
    loss = jnp.mean(quadratic_loss(p, data))
    return loss + RHO / 2 * (
      noise.mean_gradient_sq_norm + coefficient * noise.trace
    )

  return jax.jit(jax.grad(objective))(params)


def noise_trace_gradient(params, data):
  return jax.grad(
    lambda p: diagnostics.gradient_noise(quadratic_loss, p, data).trace
  )(params)


class ImplicitRegularizerTest(parameterized.TestCase):
  @parameterized.parameters(1, 2, 3, 4, 6)
  def test_m_usam_averages_to_the_noise_regularizer(self, m):
    params, data = problem()
    average = average_over_subsets(usam_step, params, data, m)
    coefficient = diagnostics.micro_batch_coefficient(m, NUM_EXAMPLES)
    self.assertAlmostEqual(
      coefficient, (NUM_EXAMPLES - m) / (m * (NUM_EXAMPLES - 1))
    )
    expected = regularized_gradient(params, data, coefficient)
    np.testing.assert_allclose(
      flatten(average), flatten(expected), rtol=1e-5, atol=1e-5
    )
    # The noise term is not negligible here (m < n): dropping it fails, and
    # so does the i.i.d. coefficient 1/m (the subsets are drawn without
    # replacement).
    noise_term = (
      RHO / 2 * coefficient * flatten(noise_trace_gradient(params, data))
    )
    if m < NUM_EXAMPLES:
      self.assertGreater(float(jnp.linalg.norm(noise_term)), 1e-2)
      for wrong in (0.0, 1.0 / m):
        if wrong != coefficient:
          self.assertGreater(
            float(
              jnp.max(
                jnp.abs(
                  flatten(average)
                  - flatten(regularized_gradient(params, data, wrong))
                )
              )
            ),
            1e-2,
          )

  @parameterized.parameters(1, 2, 3)
  def test_n_usam_has_no_noise_term(self, m):
    params, data = problem(seed=1)

    def n_usam_step(p, batch):
      tx = sam_optax.n_sam(RHO, normalize=False)
      updates, _ = tx.update(
        None,
        tx.init(p),
        p,
        loss_fn=quadratic_loss,
        batch=batch,
        ascent_batch=data,
      )
      return updates

    average = average_over_subsets(n_usam_step, params, data, m)
    expected = regularized_gradient(params, data, 0.0)
    np.testing.assert_allclose(
      flatten(average), flatten(expected), rtol=1e-5, atol=1e-5
    )
    # ... while m-USAM on the same micro-batches has one.
    m_usam = average_over_subsets(usam_step, params, data, m)
    self.assertGreater(
      float(jnp.linalg.norm(flatten(m_usam) - flatten(average))), 1e-2
    )

  def test_micro_batch_sq_norm_identity_along_the_way(self):
    # The identity holds at every w, which is what lets the gradients agree.
    params, data = problem(seed=2)
    for shift in (0.0, 0.5, -1.0):
      p = jax.tree.map(lambda x: x + shift, params)
      for m in (1, 2, 4):
        enumerated = average_over_subsets(
          lambda q, batch: jnp.sum(
            flatten(jax.grad(lambda r: jnp.mean(quadratic_loss(r, batch)))(q))
            ** 2
          ),
          p,
          data,
          m,
        )
        exact = diagnostics.micro_batch_gradient_sq_norm(
          quadratic_loss, p, data, m
        )
        np.testing.assert_allclose(exact, enumerated, rtol=1e-5)


def noise_loss(params, batch):
  """ℓ_i(w) = ½‖w‖² − ξ_iᵀ w: ``g_i − ∇L = −(ξ_i − ξ̄)``, the noise itself."""
  return 0.5 * jnp.sum(params**2) - batch["noise"] @ params


class MeanNoiseNormTest(parameterized.TestCase):
  """Prop. 3.9: ``E‖ξ_m‖`` decreases in ``m`` for log-concave noise."""

  @parameterized.parameters("gaussian", "laplace")
  def test_decreases_in_micro_batch_size(self, distribution):
    rng = np.random.default_rng(3)
    scales = np.array([3.0, 1.0, 1.0, 0.5, 0.2, 0.1])
    size = 4096
    if distribution == "gaussian":
      noise = rng.normal(size=(size, scales.size)) * scales
    else:
      noise = rng.laplace(size=(size, scales.size)) * scales
    data = {"noise": jnp.asarray(noise, jnp.float32)}
    params = jnp.asarray(rng.normal(size=scales.size), jnp.float32)
    gradient_noise = diagnostics.gradient_noise(noise_loss, params, data)
    norms = []
    sizes = (1, 3, 9, 27)
    for m in sizes:
      sampled = diagnostics.sample_micro_batch_gradients(
        noise_loss,
        params,
        data,
        m,
        jax.random.key(m),
        num_samples=512,
        full_gradient=gradient_noise.mean_gradient,
      )
      norms.append(sampled.noise_norm)
    for smaller, larger in itertools.pairwise(norms):
      gap = float(smaller.mean - larger.mean)
      error = float(jnp.hypot(smaller.standard_error, larger.standard_error))
      self.assertGreater(gap, 4 * error)
    # Jensen: E‖ξ_m‖ <= sqrt(E‖ξ_m‖²) = sqrt(c_m tr Σ), within noise.
    for m, estimate in zip(sizes, norms):
      bound = np.sqrt(
        diagnostics.micro_batch_coefficient(m, size)
        * float(gradient_noise.trace)
      )
      self.assertLess(
        float(estimate.mean), bound + 3 * float(estimate.standard_error)
      )


class FisherTest(absltest.TestCase):
  """At a well-specified NLL's minimum, ``tr Σ ≈ tr H`` (Fisher ≈ Hessian)."""

  def test_logistic_regression_at_its_minimum(self):
    rng = np.random.default_rng(4)
    size, dim = 8000, 4
    features = rng.normal(size=(size, dim))
    true_weights = np.array([1.0, -0.5, 0.25, 0.0])
    labels = rng.uniform(size=size) < 1 / (1 + np.exp(-features @ true_weights))
    data = {
      "x": jnp.asarray(features, jnp.float32),
      "y": jnp.asarray(labels, jnp.float32),
    }

    def nll(w, batch):
      logits = batch["x"] @ w
      return jnp.logaddexp(0.0, logits) - batch["y"] * logits

    mean_nll = lambda w: jnp.mean(nll(w, data))
    newton = jax.jit(
      lambda w: (
        w - jnp.linalg.solve(jax.hessian(mean_nll)(w), jax.grad(mean_nll)(w))
      )
    )
    w = jnp.zeros(dim)
    for _ in range(10):  # Newton: converges to the maximum-likelihood w.
      w = newton(w)
    noise = diagnostics.gradient_noise(nll, w, data, chunk_size=1000)
    self.assertLess(float(noise.mean_gradient_sq_norm), 1e-8)
    hessian_trace = float(jnp.trace(jax.hessian(mean_nll)(w)))
    top = diagnostics.hessian_top_eigenpair(
      nll, w, data, jax.random.key(0), chunk_size=1000
    )
    np.testing.assert_allclose(
      top.value, np.linalg.eigvalsh(jax.hessian(mean_nll)(w))[-1], rtol=1e-4
    )
    # Equal in expectation over the data; 8000 examples: within 5%.
    np.testing.assert_allclose(float(noise.trace), hessian_trace, rtol=0.05)


if __name__ == "__main__":
  absltest.main()
