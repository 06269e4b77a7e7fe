"""WORKDIR/plan.json: `lmos plan --write` and `lmos tune --write` merge into it, and
`--config.plan` applies it (each value logged, wrong keys and types refused)."""

from __future__ import annotations

import json

import pytest

from lmos_jax.config.loading import ConfigError
from lmos_jax.config.plan_file import apply_plan, read_plan, write_plan
from lmos_jax.config.schema import base_config


def test_plan_and_tune_merge_and_training_applies_both(tmp_path):
  write_plan(tmp_path / "wd", {"mesh.fsdp": 2, "train.microbatches": 2}, "lmos plan")
  path = write_plan(tmp_path / "wd", {"train.lr": 0.003, "train.batch_size": 16}, "lmos tune")
  saved = json.loads(path.read_text())
  assert saved["_sources"] == {"mesh.fsdp": "lmos plan", "train.microbatches": "lmos plan",
                               "train.lr": "lmos tune", "train.batch_size": "lmos tune"}
  cfg = base_config()
  cfg.plan = str(path)
  lines = apply_plan(cfg)
  assert (cfg.mesh.fsdp, cfg.train.microbatches, cfg.train.lr, cfg.train.batch_size) == (
      2, 2, 0.003, 16)
  assert len(lines) == 4 and any("train.lr=0.003" in l and "lmos tune" in l for l in lines)
  assert apply_plan(base_config()) == []  # no plan: nothing changes


def test_an_int_fills_a_float_key(tmp_path):
  path = write_plan(tmp_path, {"train.lr": 1}, "hand")
  cfg = base_config()
  cfg.plan = str(path)
  apply_plan(cfg)
  assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


@pytest.mark.parametrize("content, match", [
    ('{"train.lrr": 0.1}', "'train.lrr' is not a config key"),
    ('{"train.batch_size": "big"}', "has type str"),
    ('[1, 2]', "expected a JSON object"),
    ('{"train.lr": ', "not a readable JSON object"),
])
def test_bad_plan_files_name_the_key_or_the_file(tmp_path, content, match):
  (tmp_path / "plan.json").write_text(content)
  cfg = base_config()
  cfg.plan = str(tmp_path / "plan.json")
  with pytest.raises(ConfigError, match=match):
    apply_plan(cfg)


def test_a_missing_plan_says_how_to_write_one(tmp_path):
  with pytest.raises(ConfigError, match="lmos plan --write"):
    read_plan(tmp_path / "nope.json")
