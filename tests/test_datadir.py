"""Where dataset paths come from: an explicit value, else $LMOS_DATA_DIR, else data/."""

from pathlib import Path

import pytest

from lmos_jax.config.datadir import data_dir, data_file
from lmos_jax.config.loading import load_config_file
from lmos_jax.data.build import build_data
from lmos_jax.data.encoder import read_tsv


def test_resolution_order(monkeypatch, tmp_path):
  monkeypatch.delenv("LMOS_DATA_DIR", raising=False)
  assert data_dir() == Path("data")
  assert data_file("sst2/train.tsv") == str(Path("data/sst2/train.tsv"))
  monkeypatch.setenv("LMOS_DATA_DIR", "")  # set but empty: as if unset
  assert data_dir() == Path("data")
  monkeypatch.setenv("LMOS_DATA_DIR", str(tmp_path / "env"))
  assert data_dir() == tmp_path / "env"
  assert data_file("tinyshakespeare.txt") == str(tmp_path / "env" / "tinyshakespeare.txt")
  assert data_dir(tmp_path / "flag") == tmp_path / "flag"  # an explicit value wins
  assert data_file("a.txt", str(tmp_path / "flag")) == str(tmp_path / "flag" / "a.txt")


def test_configs_take_their_data_from_the_env_var(monkeypatch, tmp_path):
  monkeypatch.setenv("LMOS_DATA_DIR", str(tmp_path))
  cfg = load_config_file("configs/shakespeare_char.py:cpu")
  assert cfg.data.path == str(tmp_path / "tinyshakespeare.txt")
  monkeypatch.delenv("LMOS_DATA_DIR")
  assert load_config_file("configs/shakespeare_char.py:cpu").data.path == str(
      Path("data/tinyshakespeare.txt"))


def test_missing_data_file_names_the_path_the_field_and_the_fix(monkeypatch, tmp_path):
  monkeypatch.setenv("LMOS_DATA_DIR", str(tmp_path))
  cfg = load_config_file("configs/shakespeare_char.py:cpu")
  want = str(tmp_path / "tinyshakespeare.txt")
  with pytest.raises(FileNotFoundError) as e:
    build_data(cfg)
  msg = str(e.value)
  assert want in msg and "'data.path'" in msg and "LMOS_DATA_DIR" in msg, msg
  with pytest.raises(FileNotFoundError) as e:
    read_tsv(str(tmp_path / "sst2" / "dev.tsv"), field="data.dev")
  msg = str(e.value)
  assert "dev.tsv" in msg and "'data.dev'" in msg and "LMOS_DATA_DIR" in msg, msg
