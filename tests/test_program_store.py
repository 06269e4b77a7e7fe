"""Traced programs stored with jax.export: stored once, read back by a later store of the same
key, bit-identical to the directly jitted function, other shapes sent to that function, a
changed key or a damaged file traced afresh, and nothing stored without a directory."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from lmos_jax.parallel.program_store import ProgramStore, program_key


def _problem():
  """A train-step-like program over a state with integer-keyed dicts (a model's layer list)
  and optax's namedtuple states, sharded over a 2-device data mesh."""
  mesh = jax.make_mesh((2,), ("data",))
  rep, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  params = {"blocks": {0: {"w": jnp.full((4, 4), 0.5)}, 1: {"w": jnp.eye(4)}}}
  tx = optax.adamw(1e-2)
  state = {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}
  state = jax.device_put(state, rep)

  def step(s, x_BD):
    def loss(p):
      h = x_BD
      for i in sorted(p["blocks"]):
        h = jnp.tanh(h @ p["blocks"][i]["w"])
      return jnp.mean(h ** 2)
    value, grads = jax.value_and_grad(loss)(s["params"])
    updates, opt = tx.update(grads, s["opt"], s["params"])
    return ({"params": optax.apply_updates(s["params"], updates), "opt": opt,
             "step": s["step"] + 1}, {"loss": value})

  state_sh = jax.tree.map(lambda _: rep, state)
  jitted = jax.jit(step, in_shardings=(state_sh, rows), out_shardings=(state_sh, rep),
                   donate_argnums=0)
  specs = (jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state),
           jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=rows))
  x = jax.device_put(jnp.arange(32, dtype=jnp.float32).reshape(8, 4) / 32.0, rows)
  return mesh, state, jitted, specs, x


def _copy(tree):
  return jax.tree.map(lambda a: a.copy(), tree)  # the programs donate their state argument


def _run(fn, state, x, calls=3):
  out = []
  for _ in range(calls):
    state, m = fn(state, x)
    out.append(float(m["loss"]))
  return out, jax.tree.map(np.asarray, state)


def test_stored_program_reads_back_and_matches_the_jitted_function_bit_for_bit(tmp_path):
  mesh, state, jitted, specs, x = _problem()
  want_losses, want_state = _run(jitted, _copy(state), x)

  first = ProgramStore(tmp_path, {"config": "a"})
  fn = first.jit("step", jitted, specs, mesh, donate_argnums=(0,))
  assert (first.stored, first.read, first.skipped) == (["step"], [], [])
  assert len(list(tmp_path.glob("step-*.pkl"))) == 1
  losses, got_state = _run(fn, _copy(state), x)

  later = ProgramStore(tmp_path, {"config": "a"})  # a later run: same key
  fn2 = later.jit("step", jitted, specs, mesh, donate_argnums=(0,))
  assert (later.stored, later.read) == ([], ["step"])
  assert later.summary() == "1 traced program(s) read back"
  losses2, got_state2 = _run(fn2, _copy(state), x)

  assert losses == want_losses == losses2
  for a, b, c in zip(jax.tree.leaves(want_state), jax.tree.leaves(got_state),
                     jax.tree.leaves(got_state2)):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
  assert jax.tree.structure(got_state) == jax.tree.structure(want_state)


def test_other_shapes_run_the_jitted_function(tmp_path):
  mesh, state, jitted, specs, _ = _problem()
  fn = ProgramStore(tmp_path, {}).jit("step", jitted, specs, mesh, donate_argnums=(0,))
  wide = jax.device_put(jnp.ones((4, 4)), NamedSharding(mesh, P("data")))  # 4 rows, not 8
  _, m = fn(_copy(state), wide)
  _, want = jitted(_copy(state), wide)
  assert float(m["loss"]) == float(want["loss"])


def test_changed_key_or_damaged_file_traces_afresh(tmp_path):
  mesh, _, jitted, specs, _ = _problem()
  ProgramStore(tmp_path, {"config": "a"}).jit("step", jitted, specs, mesh)
  other = ProgramStore(tmp_path, {"config": "b"})
  other.jit("step", jitted, specs, mesh)
  assert other.stored == ["step"] and len(list(tmp_path.glob("step-*.pkl"))) == 2

  env = other.environment()
  narrow = (specs[0], jax.ShapeDtypeStruct((2, 4), jnp.float32, sharding=specs[1].sharding))
  assert program_key("step", specs, mesh, {}, env) != program_key("step", narrow, mesh, {}, env)
  assert program_key("step", specs, mesh, {}, env) != program_key("other", specs, mesh, {}, env)

  for path in tmp_path.glob("step-*.pkl"):
    path.write_bytes(path.read_bytes()[:100])  # truncated
  again = ProgramStore(tmp_path, {"config": "a"})
  again.jit("step", jitted, specs, mesh)
  assert (again.read, again.stored) == ([], ["step"])


def test_without_a_directory_the_jitted_function_is_returned():
  mesh, _, jitted, specs, _ = _problem()
  store = ProgramStore(None, {})
  assert store.jit("step", jitted, specs, mesh) is jitted
  assert store.summary() == ""
