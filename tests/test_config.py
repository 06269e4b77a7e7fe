"""Config validation: each bad field gives one clear error naming it, before any compile."""

import pytest

from helpers import tiny_config
from lmos_jax.config.loading import ConfigError, load_config_file, validate


def _bad(mutate, devices=8):
  c = tiny_config()
  with c.unlocked():
    mutate(c)
  with pytest.raises(ConfigError) as e:
    validate(c, devices)
  return str(e.value)


def test_valid_configs_pass():
  validate(tiny_config(), 8)
  for spec, devices in (("configs/default.py", 8), ("configs/shakespeare_char.py:cpu", 1),
                        ("configs/shakespeare_char.py:baby", 8), ("configs/gpt2_124m.py", 8)):
    validate(load_config_file(spec), devices)


def test_unknown_key():
  msg = _bad(lambda c: c.train.__setattr__("learning_rate", 1e-3))
  assert "'train.learning_rate'" in msg and "unknown" in msg


def test_wrong_type():
  def mutate(c):
    c.model.__delitem__("num_layers")
    c.model.num_layers = "four"
  msg = _bad(mutate)
  assert "'model.num_layers'" in msg and "int" in msg


def test_mesh_does_not_match_devices():
  def mutate(c):
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 3, 2, 1
  msg = _bad(mutate)
  assert "mesh.data" in msg and "8 are present" in msg


def test_batch_not_divisible_by_data_axes():
  def mutate(c):
    c.train.batch_size = 12
    c.mesh.data, c.mesh.fsdp = 4, 2
  msg = _bad(mutate)
  assert "'train.batch_size'=12" in msg and "mesh.data*mesh.fsdp=8" in msg


def test_sequence_longer_than_positions():
  msg = _bad(lambda c: c.data.__setattr__("seq_len", 64))
  assert "'data.seq_len'=64" in msg and "'model.max_seq_len'=16" in msg


def test_bad_choice_and_shapes():
  assert "'model.norm'" in _bad(lambda c: c.model.__setattr__("norm", "batchnorm"))
  assert "'mesh.opt_state'='zero1'" in _bad(lambda c: c.mesh.__setattr__("opt_state", "zero1"))
  assert "'model.num_heads'" in _bad(lambda c: c.model.__setattr__("num_heads", 5))
  assert "'train.microbatches'" in _bad(lambda c: c.train.__setattr__("microbatches", 3))
  # a zero interval used to pass validation and divide by zero after the first step
  assert "'train.eval_every'=0" in _bad(lambda c: c.train.__setattr__("eval_every", 0))
  assert "'train.log_every'=0" in _bad(lambda c: c.train.__setattr__("log_every", 0))
  assert "'train.steps_per_call'=0" in _bad(lambda c: c.train.__setattr__("steps_per_call", 0))
  msg = _bad(lambda c: (c.train.__setattr__("steps_per_call", 4),
                        c.train.__setattr__("steps", 1000), c.train.__setattr__("log_every", 10)))
  assert "'train.log_every'=10 is not a multiple of 'train.steps_per_call'=4" in msg


def test_config_file_arg_errors(tmp_path):
  with pytest.raises(ConfigError, match="no such file"):
    load_config_file(str(tmp_path / "missing.py"))
  with pytest.raises(ValueError, match="cpu or baby"):
    load_config_file("configs/shakespeare_char.py:huge")


def test_bpe_vocabulary_holds_the_bytes_and_the_special_set():
  """The minimum is 256 + the size of the set the run adds (3 for lm, 5 for bert, which
  masked-LM pretraining picks under 'auto'), checked by validate, not later by the data
  build."""
  def bpe(size, specials="auto", task=None):
    def mutate(c):
      c.data.tokenizer, c.data.bpe_vocab_size, c.data.specials = "bpe", size, specials
      if task:
        c.task = task
    return mutate
  assert "at least 259" in _bad(bpe(258))
  assert "at least 261" in _bad(bpe(260, "bert")) and "bert" in _bad(bpe(260, "bert"))
  assert "at least 261" in _bad(bpe(259, task="mlm"))
  c = tiny_config()
  bpe(259)(c)
  validate(c, 8)
