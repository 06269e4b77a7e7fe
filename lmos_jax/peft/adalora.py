"""AdaLoRA (Zhang et al. 2023): SVD-form updates P diag(lambda) Q with a global rank budget.

- `SVDDense`: y = x W + (alpha / r) x P diag(lambda) Q; lambda = 0 at init (so the adapted
  model equals the base). P and Q start with orthonormal columns / rows (a random QR), where
  the orthogonality penalty wants them; the reference code draws N(0, 0.02), which leaves
  x P Q about 1e-2 of x, so Adam's lr-sized lambda steps barely move the output in a short
  finetune (measured: SST-2 stayed at chance after 94 steps).
- `adalora`: an optax wrapper around the trainable optimizer. Each step it scores every
  singular value by sensitivity |theta * grad| smoothed by an EMA (I) times its uncertainty
  (U, an EMA of |s - I|) summed over the triplet (lambda_i, column i of P, row i of Q), and
  keeps the top-b(t) singular values of the whole model, b(t) following the cubic budget
  schedule: b0 until t_init, cubic decay to the target, fixed for the last t_final steps.
  Pruned lambdas are held at exactly 0 by the update itself (the mask lives in the
  optimizer state, so a resumed run continues the same schedule). Kept lambdas take
  `lambda_lr_scale` x the inner optimizer's step: with P, Q held orthonormal by the penalty,
  ||dW||_2 = (alpha / r) max|lambda|, and Adam moves lambda by about lr per step, so with
  scale 1 a short finetune cannot grow the update (measured: SST-2 dev 51% after 94 steps
  at lr 3e-3, the tiny marker task flat at ln 2); LoRA's B has r * d_out entries moving at lr,
  about sqrt(d_out) times the change per step.
- `orthogonality_penalty`: mean ||P^T P - I||_F + ||Q Q^T - I||_F, added to the loss.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lmos_jax.config.loading import ConfigError
from lmos_jax.models.layers import Dense
from lmos_jax.peft.lora import input_dropout, make_dropout_key
from lmos_jax.peft.wrap import new_param, replace_dense, take_base
from lmos_jax.tree import path_names

Array = jax.Array
SVD_NAMES = ("lora_p", "lora_lambda", "lora_q")


class SVDDense(Dense):
  """Dense plus P diag(lambda) Q of rank r (pruned ranks have lambda = 0)."""

  def __init__(self, base: Dense, rank: int, alpha: float, rate: float, *, rngs: nnx.Rngs):
    lead, in_s, out_s, lead_n, in_n, out_n = take_base(self, base)
    n_in, n_out = int(np.prod(in_s)), int(np.prod(out_s))
    if rank > min(n_in, n_out):
      raise ConfigError(f"config 'peft.rank'={rank} exceeds the layer's size {in_s}->{out_s}")
    p = orthonormal_columns(rngs.params(), (*lead, n_in, rank))
    q = jnp.swapaxes(orthonormal_columns(rngs.params(), (*lead, n_out, rank)), -1, -2)
    self.lora_p = new_param(p.reshape(*lead, *in_s, rank), (*lead_n, *in_n, "lora_rank"))
    self.lora_lambda = new_param(jnp.zeros((*lead, rank), jnp.float32),
                                 (*lead_n, "lora_rank"))
    self.lora_q = new_param(q.reshape(*lead, rank, *out_s), (*lead_n, "lora_rank", *out_n))
    self.scale = float(alpha) / rank
    self.rate = float(rate)
    self.dropout_key = make_dropout_key(lead, rate)

  def __call__(self, x: Array) -> Array:
    y = super().__call__(x)
    axes = (tuple(range(x.ndim - self.in_ndim, x.ndim)), tuple(range(self.in_ndim)))
    h = jnp.tensordot(input_dropout(x, self.rate, self.dropout_key),
                      self.lora_p[...].astype(x.dtype), axes=axes)
    h = h * self.lora_lambda[...].astype(x.dtype)
    return y + self.scale * jnp.tensordot(h, self.lora_q[...].astype(x.dtype),
                                          axes=((-1,), (0,)))


def orthonormal_columns(key: Array, shape: tuple[int, ...]) -> Array:
  """(..., n, r) with orthonormal columns (n >= r): QR of a Gaussian, signs fixed."""
  q, r = jnp.linalg.qr(jax.random.normal(key, shape, jnp.float32))
  return q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[..., None, :]


def apply_adalora(model: nnx.Module, target: str, rank: int, alpha: float, rate: float,
                  rngs: nnx.Rngs | int = 0) -> list[str]:
  """In place: SVD-form adapters on every Dense matching `target`."""
  if rank <= 0:
    raise ConfigError(f"config 'peft.rank'={rank} must be positive")
  rngs = nnx.Rngs(params=rngs) if isinstance(rngs, int) else rngs
  return replace_dense(model, target, lambda d, _: SVDDense(d, rank, alpha, rate, rngs=rngs),
                       "peft.target_modules")


def orthogonality_penalty(model: nnx.Module) -> Array:
  """Mean over (module, layer) of ||P^T P - I||_F + ||Q Q^T - I||_F."""
  total, count = jnp.zeros((), jnp.float32), 0
  for _, m in nnx.iter_modules(model):
    if not isinstance(m, SVDDense):
      continue
    p, q = m.lora_p[...].astype(jnp.float32), m.lora_q[...].astype(jnp.float32)
    r = p.shape[-1]
    lead = m.lora_lambda.shape[:-1]
    p2 = p.reshape(*lead, -1, r)
    q2 = q.reshape(*lead, r, -1)
    eye = jnp.eye(r, dtype=jnp.float32)
    pp = jnp.swapaxes(p2, -1, -2) @ p2 - eye
    qq = q2 @ jnp.swapaxes(q2, -1, -2) - eye
    fro = lambda a: jnp.sqrt(jnp.sum(jnp.square(a), axis=(-2, -1)))  # noqa: E731
    total = total + jnp.sum(fro(pp) + fro(qq))
    count += 2 * max(int(np.prod(lead)), 1)
  return total / max(count, 1)


class BudgetSchedule(NamedTuple):
  """AdaLoRA's rank budget: counts are per (module, layer) slot."""

  init_rank: int
  target_rank: int
  t_init: int
  t_final: int
  delta_t: int
  total_steps: int
  beta1: float = 0.85
  beta2: float = 0.85


def budget_at(s: BudgetSchedule, t: Array, slots: int) -> tuple[Array, Array]:
  """(total kept singular values, whether to recompute the mask) after update number t."""
  b0, bt = s.init_rank * slots, s.target_rank * slots
  end = s.total_steps - s.t_final
  frac = jnp.clip((t - s.t_init) / max(end - s.t_init, 1), 0.0, 1.0)
  mid = jnp.floor((b0 - bt) * (1.0 - frac) ** 3 + bt).astype(jnp.int32)
  budget = jnp.where(t <= s.t_init, b0, jnp.where(t > end, bt, mid))
  update = ((t > s.t_init) & (t <= end) & (t % s.delta_t == 0)) | (t == end + 1)
  return budget.astype(jnp.int32), update


class AdaLoRAState(NamedTuple):
  inner: Any
  ipt: dict
  unc: dict
  mask: dict
  count: Array


def _flat(tree: Any) -> dict[str, Any]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(path_names(p)): leaf for p, leaf in flat}


def _svd_leaves(tree: Any) -> dict[str, Any]:
  return {k: v for k, v in _flat(tree).items() if k.rsplit("/", 1)[-1] in SVD_NAMES}


def _module_prefixes(svd: dict[str, Any]) -> list[str]:
  return sorted(k.rsplit("/", 1)[0] for k in svd if k.endswith("/lora_lambda"))


def rank_scores(ipt: dict, unc: dict, prefix: str, in_ndim: int) -> Array:
  """Triplet score (lead..., r): lambda_i + mean over P[:, i] + mean over Q[i, :]."""
  s = {n: ipt[f"{prefix}/{n}"] * unc[f"{prefix}/{n}"] for n in SVD_NAMES}
  lam = s["lora_lambda"]
  lead = lam.ndim - 1
  p_axes = tuple(range(lead, lead + in_ndim))
  q_axes = tuple(range(lead + 1, s["lora_q"].ndim))
  return lam + s["lora_p"].mean(axis=p_axes) + s["lora_q"].mean(axis=q_axes)


def adalora(inner: optax.GradientTransformation, sched: BudgetSchedule,
            lambda_lr_scale: float = 1.0) -> optax.GradientTransformation:
  """Wraps `inner` with importance scoring, budget masking of lambda, and EMA state.

  Kept lambdas move `lambda_lr_scale` times the inner update (see the module docstring).
  """

  def init(params):
    svd = _svd_leaves(params)
    if not svd:
      raise ValueError("peft.method='adalora' found no lora_lambda params to budget")
    zeros = {k: jnp.zeros(v.shape, jnp.float32) for k, v in svd.items()}
    mask = {p: jnp.ones(svd[f"{p}/lora_lambda"].shape, jnp.float32)
            for p in _module_prefixes(svd)}
    return AdaLoRAState(inner.init(params), zeros, dict(zeros), mask,
                        jnp.zeros((), jnp.int32))

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("adalora needs params in update() to score importance")
    g, p = _svd_leaves(grads), _svd_leaves(params)
    ipt, unc = {}, {}
    for k in state.ipt:
      sens = jnp.abs(p[k].astype(jnp.float32) * g[k].astype(jnp.float32))
      ipt[k] = sched.beta1 * state.ipt[k] + (1 - sched.beta1) * sens
      unc[k] = sched.beta2 * state.unc[k] + (1 - sched.beta2) * jnp.abs(sens - ipt[k])
    prefixes = sorted(state.mask)
    in_ndims = {pre: p[f"{pre}/lora_p"].ndim - p[f"{pre}/lora_lambda"].ndim
                for pre in prefixes}
    scores = [rank_scores(ipt, unc, pre, in_ndims[pre]) for pre in prefixes]
    sizes = [int(np.prod(s.shape)) for s in scores]
    flat_scores = jnp.concatenate([s.reshape(-1) for s in scores])
    slots = sum(sizes) // sched.init_rank
    t = state.count + 1
    budget, do_update = budget_at(sched, t, slots)
    order = jnp.argsort(jnp.argsort(flat_scores))  # 0 = least important
    keep_flat = (order >= flat_scores.size - budget).astype(jnp.float32)
    mask, offset = {}, 0
    for pre, s, n in zip(prefixes, scores, sizes):
      new = keep_flat[offset:offset + n].reshape(s.shape)
      mask[pre] = jnp.where(do_update, new, state.mask[pre])
      offset += n
    updates, inner_state = inner.update(grads, state.inner, params)

    def hold(path, u, w):
      key = "/".join(path_names(path))
      if key.endswith("/lora_lambda") and key.rsplit("/", 1)[0] in mask:
        m = mask[key.rsplit("/", 1)[0]] > 0
        return jnp.where(m, u * lambda_lr_scale, -w).astype(u.dtype)
      return u
    updates = jax.tree_util.tree_map_with_path(hold, updates, params)
    return updates, AdaLoRAState(inner_state, ipt, unc, mask, t)

  return optax.GradientTransformation(init, update)


def svd_delta_kernel(m: SVDDense) -> Array:
  """scale * P diag(lambda) Q in the kernel's (lead..., in..., out...) shape."""
  p, lam, q = m.lora_p[...], m.lora_lambda[...], m.lora_q[...]
  lead = lam.ndim - 1
  p2 = p.reshape(*p.shape[:lead], -1, p.shape[-1]) * lam[..., None, :]
  q2 = q.reshape(*q.shape[:lead + 1], -1)
  return (m.scale * (p2 @ q2)).reshape(m.kernel.shape).astype(m.kernel.dtype)
