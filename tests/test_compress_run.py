"""`lmos compress --method`: each method writes a run that generate/predict load and run."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_classifier_workdir, tiny_gpt_workdir
from lmos_jax.compress.store import load_compressed
from lmos_jax.errors import UserError
from lmos_jax.inference.compress_run import compress_to_workdir, parse_method
from lmos_jax.inference.generate import load_trained
from lmos_jax.models.decode import Decoder
from lmos_jax.models.quantized import QArray, is_qarray

CHARS = "abcdefgh \n"


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
  return tiny_gpt_workdir(tmp_path_factory.mktemp("src") / "lm", CHARS, layers=3)


def _kernels(params):
  leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_qarray)[0]
  return {jax.tree_util.keystr(p): x for p, x in leaves if "kernel" in jax.tree_util.keystr(p)}


@pytest.mark.parametrize("method", ["int8", "int4:group=8", "bf16", "prune:alpha=0.3",
                                    "prune:sparsity=0.5", "nm:2:4"])
def test_each_method_writes_a_run_that_generates(lm, tmp_path, method):
  out = tmp_path / "out"
  rec = compress_to_workdir(str(lm), method, str(out))
  assert rec["weight_bytes"] < rec["source_weight_bytes"] or method.startswith(("prune", "nm"))
  run = load_trained(out)  # through the run-directory owner, checked against config.json
  src = load_trained(lm)
  kernels, src_kernels = _kernels(run.params), _kernels(src.params)
  assert kernels.keys() == src_kernels.keys() and kernels
  for name, k in kernels.items():
    w = np.asarray(src_kernels[name])
    if method.startswith("int"):
      assert isinstance(k, QArray) and k.bits == int(method[3]) and k.shape == w.shape
    elif method == "bf16":
      np.testing.assert_array_equal(np.asarray(k), w.astype(jnp.bfloat16))
      assert k.dtype == jnp.bfloat16
    else:
      k = np.asarray(k)
      kept = k != 0
      # a pruned kernel keeps exactly the surviving weights, unchanged
      np.testing.assert_array_equal(k[kept], w[kept])
      if method == "prune:alpha=0.3":
        # per kernel: each layer of a stacked (scanned) kernel has its own max
        per_layer = "blocks" in name and run.cfg.model.scan_layers
        axes = tuple(range(1, w.ndim)) if per_layer else None
        np.testing.assert_array_equal(
            kept, np.abs(w) >= 0.3 * np.abs(w).max(axis=axes, keepdims=True))
      elif method == "prune:sparsity=0.5":
        assert abs(1 - kept.mean() - 0.5) < 0.05
      else:  # 2 of every 4 consecutive inputs (random weights: no ties)
        assert kept.mean() == 0.5
  tokens = Decoder(run.graphdef, 16).generate(run.params, [[1, 2]], 8).tokens
  assert len(tokens[0]) == 8
  meta = load_compressed(out / "params.safetensors")[1]
  assert meta["method"] == parse_method(method).describe() and meta["source"] == str(lm)


@pytest.mark.parametrize("method,note", [("trim:layers=1", "dropped layers"),
                                         ("distill:layers=2,steps=3", "student of teacher")])
def test_fewer_layers_record_them_and_generate_cli_runs_it(lm, tmp_path, method, note):
  out = tmp_path / "small"
  text = tmp_path / "train.txt"
  text.write_text("abc defg hab\n" * 200)
  rec = compress_to_workdir(str(lm), method, str(out), data_path=str(text))
  assert note in rec["note"]
  layers = int(method.split("layers=")[1].split(",")[0])
  assert json.loads((out / "config.json").read_text())["model"]["num_layers"] == layers
  assert load_trained(out).cfg.model.num_layers == layers
  res = subprocess.run([sys.executable, "-m", "lmos_jax.cli", "generate", "--workdir", str(out),
                        "--prompt", "ab", "--max-new-tokens", "5", "--seed", "0"],
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr
  assert "generated 5 tokens" in res.stderr


def test_classifier_int8_predicts_like_its_source(tmp_path):
  from lmos_jax.inference.predict import load_classifier
  src = tiny_classifier_workdir(tmp_path / "src", ["neg", "pos", "neutral"])
  out = tmp_path / "int8"
  compress_to_workdir(str(src), "int8", str(out))
  texts = ["a fine film", "not good at all", "the plot is thin but the cast is great"]
  p_src, p_q = load_classifier(src).predict(texts), load_classifier(out).predict(texts)
  # per-channel int8 moves each weight by <= 1/254 of its channel's largest: over 2 layers
  # of width 32 the probabilities move by a few thousandths, not more
  assert np.abs(p_q - p_src).max() < 0.02
  assert (out / "labels.json").read_text() == (src / "labels.json").read_text()


def test_classifier_bf16_predicts_like_its_source(tmp_path):
  from lmos_jax.data.encoder import bucket_widths
  from lmos_jax.inference.predict import load_classifier, run_packed
  src = tiny_classifier_workdir(tmp_path / "src", ["neg", "pos", "neutral"])
  out = tmp_path / "bf16"
  compress_to_workdir(str(src), "bf16", str(out))
  texts = ["a fine film", "not good at all", "the plot is thin but the cast is great"]
  a, b = load_classifier(src), load_classifier(out)
  assert b.cfg.peft.method == "full"
  # bf16 kernels and bf16-rounded activations at each matmul (2^-9 relative), two layers of
  # width 32 drawn wide: the probabilities move by a few thousandths, padded or packed
  assert 0 < np.abs(b.predict(texts) - a.predict(texts)).max() < 0.02
  widths = bucket_widths("auto", a.cfg.data.seq_len)
  (p_a, e_a), (p_b, e_b) = (run_packed(c, texts, None, widths, 4, 4) for c in (a, b))
  assert np.abs(p_b - p_a).max() < 0.02 and np.abs(e_b - e_a).max() < 0.02


@pytest.mark.parametrize("spec", ["int3", "prune", "prune:alpha=2", "nm:4:2", "trim",
                                  "int4:group=x", "prune:alpha=0.1,sparsity=0.5",
                                  "trim:layers=1.5", "int8:group=3", "bf16:group=8", "distill:steps=3",
                                  "distill:layers=2,kd=1.5", "distill:layers=2,temp=0",
                                  "trim:layers=2,kd=1"])
def test_bad_methods_are_one_line_errors(spec):
  with pytest.raises(UserError, match="--method"):
    parse_method(spec)


def test_distill_options_default_and_override():
  assert parse_method("distill:layers=2").options == {"layers": 2, "steps": 300, "kd": 0.5,
                                                      "temp": 2.0}
  assert parse_method("distill:layers=2,steps=50,kd=1,temp=1").options == {
      "layers": 2, "steps": 50, "kd": 1.0, "temp": 1.0}


def test_refuses_an_existing_run_and_lm_only_methods_on_classifiers(lm, tmp_path):
  with pytest.raises(UserError, match="already holds"):
    compress_to_workdir(str(lm), "int8", str(lm.parent / "lm"))
  src = tiny_classifier_workdir(tmp_path / "cls", ["a", "b"])
  with pytest.raises(UserError, match="language-model runs"):
    compress_to_workdir(str(src), "trim:layers=1", str(tmp_path / "t"))
  assert not (tmp_path / "t").exists()


def test_pruned_classifier_exports_to_hf_and_a_quantized_one_is_refused(tmp_path):
  from transformers import AutoModelForSequenceClassification

  from lmos_jax.convert import to_hf_from_workdir
  from lmos_jax.inference.predict import load_classifier
  src = tiny_classifier_workdir(tmp_path / "src", ["neg", "pos"])
  pruned, quant = tmp_path / "pruned", tmp_path / "int4"
  compress_to_workdir(str(src), "prune:sparsity=0.5", str(pruned))
  compress_to_workdir(str(src), "int4:group=8", str(quant))
  hf = to_hf_from_workdir(pruned, tmp_path / "hf")
  model = AutoModelForSequenceClassification.from_pretrained(hf)
  clf = load_classifier(pruned)
  batch = clf.encode(["a fine film", "not good"])
  import torch
  with torch.no_grad():
    logits = model(input_ids=torch.tensor(batch["inputs"]).long(),
                   token_type_ids=torch.tensor(batch["token_type_ids"]).long(),
                   attention_mask=torch.tensor(batch["attention_mask"]).long()).logits
  # transformers in PyTorch is the independent reference: the same f32 model, summation
  # order aside (2 layers of width 32: 1e-5)
  np.testing.assert_allclose(torch.softmax(logits, -1).numpy(), np.asarray(clf.forward(batch)),
                             atol=1e-5)
  with pytest.raises(UserError, match="int8/int4 codes"):
    to_hf_from_workdir(quant, tmp_path / "hf_q")
  assert not (tmp_path / "hf_q").exists()


def test_report_builds_every_recipe_from_the_method_code_and_keeps_a_report(lm, tmp_path):
  """`lmos compress --report`: the int, trim and distill variants are the `--method` ones
  (same codes, same layer choice), pruned variants are healed inside their masks, and a
  second report into the same folder needs --force."""
  from lmos_jax.inference.compress import Options, compress
  text = tmp_path / "train.txt"
  text.write_text("abc defg hab\n" * 200)
  out = tmp_path / "report"
  opts = Options(heal_steps=2, distill_steps=2, decode_batch=1)
  rows = compress(str(lm), ["dense", "int8", "int4", "prune50", "trim", "distill"], out, opts,
                  str(text))
  by = {r["variant"]: r for r in rows}
  assert list(by) == ["dense", "int8", "int4", "prune50", "trim", "distill"]
  assert all(np.isfinite(r["val_loss"]) and r["decode_tok_s"] > 0 for r in rows)
  assert by["int4"]["bytes_on_disk"] < by["int8"]["bytes_on_disk"] < by["dense"]["bytes_on_disk"]
  ref = compress_to_workdir(str(lm), "int8", str(tmp_path / "int8"), data_path=str(text))
  assert by["int8"]["note"] == ref["note"]
  assert abs(by["prune50"]["kernel_sparsity"] - 0.5) < 0.05
  assert "healed 2 steps (masked AdamW)" in by["prune50"]["note"]
  assert "dropped layers" in by["trim"]["note"] and "of 3" in by["trim"]["note"]
  assert "healed by 2 steps of LoRA" in by["trim"]["note"]
  # 2 of 3 layers, spread as `--method distill:layers=2` spreads them
  assert "student of teacher layers [0, 2], 2 steps" in by["distill"]["note"]
  assert by["trim"]["weights"] < by["dense"]["weights"]
  assert by["distill"]["weights"] == by["trim"]["weights"]
  assert {p.name for p in out.iterdir()} >= {"report.json", "report.md", "compress.png"}
  assert json.loads((out / "report.json").read_text()) == rows
  with pytest.raises(UserError, match="--force"):
    compress(str(lm), ["dense"], out, opts, str(text))
