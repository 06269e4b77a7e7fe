"""`lmos tune`'s estimators on problems with known answers: the gradient noise scale of a
linear model with Gaussian noise, and the LR range-test rule on synthetic loss curves."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmos_jax.train import tune


def linear_model_grads(n_rows: int, batch: int, rng: np.random.Generator, w_true, w):
  """Mean-squared-error gradients of y = x.w_true + noise at params w, for `n_rows` rows
  drawn fresh, grouped into batches of `batch` rows: (n_rows / batch, D)."""
  d = len(w)
  x = rng.standard_normal((n_rows, d))
  y = x @ w_true + rng.standard_normal(n_rows) * 0.5
  g_rows = (x @ w - y)[:, None] * x  # d/dw of 0.5 (x.w - y)^2, per row
  return g_rows.reshape(n_rows // batch, batch, d).mean(1)


def test_noise_scale_recovers_the_linear_models_known_value():
  """For per-row gradients g with mean G and covariance Sigma, B_simple = tr(Sigma)/|G|^2.
  Here G and Sigma are computed from a million rows (the reference), the estimator gets
  only mean squared norms at batch 8 and 64: it must land within 5% of the reference."""
  rng = np.random.default_rng(0)
  d = 16
  w_true = rng.standard_normal(d)
  w = w_true + 0.3 * rng.standard_normal(d)
  rows = linear_model_grads(1_000_000, 1, rng, w_true, w)
  G = rows.mean(0)
  reference = np.trace(np.cov(rows.T)) / (G @ G)
  small = linear_model_grads(400_000, 8, rng, w_true, w)
  big = linear_model_grads(400_000, 64, rng, w_true, w)
  ns = tune.noise_scale(float(np.mean(np.sum(small ** 2, 1))), 8,
                        float(np.mean(np.sum(big ** 2, 1))), 64)
  assert ns.b_simple == pytest.approx(reference, rel=0.05)
  assert ns.grad_sq == pytest.approx(G @ G, rel=0.05)


def test_noise_scale_hand_computed():
  # |G|^2 = (64*1.5 - 8*5) / 56 = 1; tr(Sigma) = (5 - 1.5) / (1/8 - 1/64) = 32
  ns = tune.noise_scale(5.0, 8, 1.5, 64)
  assert ns.grad_sq == pytest.approx(1.0)
  assert ns.trace_sigma == pytest.approx(32.0)
  assert ns.b_simple == pytest.approx(32.0)
  with pytest.raises(ValueError):
    tune.noise_scale(5.0, 64, 1.5, 8)


def synthetic_curve(lrs: np.ndarray, best: float) -> np.ndarray:
  """A range-test loss: flat at small LRs, falling fastest at `best` (a logistic in log-LR),
  then blowing up past 30x `best`."""
  x = np.log(lrs / best)
  loss = 3.0 - 2.0 / (1.0 + np.exp(-2.0 * x))
  return loss + np.where(lrs > 30 * best, np.exp(2.0 * np.log(lrs / (30 * best))) * 5, 0.0)


def test_range_rule_picks_the_steepest_descent_before_divergence():
  lrs = np.geomspace(1e-6, 1.0, 300)
  losses = synthetic_curve(lrs, 1e-3)
  pick = tune.lr_range_pick(lrs, losses, beta=0.0)  # no smoothing: the exact curve
  assert pick.lr == pytest.approx(1e-3, rel=0.05)
  assert pick.diverged_lr is not None and pick.diverged_lr > 30e-3
  assert pick.min_loss_lr < pick.diverged_lr
  # noise and smoothing move the pick by less than a factor 2
  noisy = losses + np.random.default_rng(1).normal(0, 0.05, len(lrs))
  pick = tune.lr_range_pick(lrs, noisy)
  assert 0.5e-3 <= pick.lr <= 2e-3


def test_range_rule_cuts_at_a_non_finite_loss_and_refuses_an_early_blow_up():
  lrs = np.geomspace(1e-5, 1.0, 100)
  losses = synthetic_curve(lrs, 1e-3)
  losses[80:] = np.nan
  pick = tune.lr_range_pick(lrs, losses, beta=0.0)
  assert pick.lr == pytest.approx(1e-3, rel=0.15)
  with pytest.raises(ValueError, match="diverged"):
    tune.lr_range_pick(lrs, np.r_[1.0, 1.0, np.full(98, np.inf)])


def test_smoothing_is_bias_corrected_and_batches_round_to_the_mesh():
  np.testing.assert_allclose(tune.smooth([2.0, 2.0, 2.0], 0.9), [2.0, 2.0, 2.0])
  assert tune.round_batch(45.0, 8, 8, 1024) == 32  # 45 is nearer 32 than 64 in log scale
  assert tune.round_batch(50.0, 8, 8, 1024) == 64
  assert tune.round_batch(math.inf, 8, 8, 256) == 256
  assert tune.warmup_steps(0.999, 100_000) == 2000
  assert tune.warmup_steps(0.999, 200) == 20


def test_lr_range_schedule_sweeps_exponentially():
  from lmos_jax.config.schema import base_config
  from lmos_jax.train.optim import make_schedule
  t = base_config().train
  t.schedule, t.lr, t.min_lr_ratio, t.steps, t.warmup_steps = "lr_range", 1.0, 1e-6, 7, 0
  got = [float(make_schedule(t)(s)) for s in range(7)]
  np.testing.assert_allclose(got, np.geomspace(1e-6, 1.0, 7), rtol=1e-5)


def test_a_check_run_moves_the_pick_only_by_a_clear_margin():
  checks = {0.5: {"final_loss": 2.78}, 1.0: {"final_loss": 2.785}, 2.0: {"final_loss": 3.1}}
  assert tune.checked_pick(checks) == 1.0  # 0.2% better: noise
  checks[2.0]["final_loss"] = 2.70
  assert tune.checked_pick(checks) == 2.0  # 3% better
