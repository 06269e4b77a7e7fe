"""Length buckets and packing for classification: batches cut to a few widths, and texts
packed side by side into rows, compute what the padded batches do; every row is still seen
once per epoch, and `train.epochs` becomes steps."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from lmos_jax.config.loading import ConfigError, validate
from lmos_jax.config.schema import base_config
from lmos_jax.data.encoder import (ClassificationData, bucket_widths, cut_to_width, fit_width,
                                   resolve_epochs, row_lengths)
from lmos_jax.data.errors import DataError
from lmos_jax.data.packing import (PackShape, first_fit_decreasing, pack_shapes, pack_texts,
                                   plan_batches)
from lmos_jax.models.bert import BERT
from lmos_jax.train.losses import cls_loss
from test_finetune import tiny_bert_cfg


def synthetic_rows(n: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
  """n rows of random lengths 3..seq_len, padded with 0 like `encode_for_classifier`."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, seq_len + 1, n)
  lengths[rng.random(n) < 0.7] //= 4  # mostly short rows, as in SST-2
  lengths = np.maximum(lengths, 3)
  cols = np.arange(seq_len)[None, :]
  mask = (cols < lengths[:, None]).astype(np.int32)
  inputs = rng.integers(5, 60, (n, seq_len)).astype(np.int32) * mask
  inputs[:, 0] = 2
  return {"inputs": inputs, "token_type_ids": np.zeros_like(inputs), "attention_mask": mask,
          "labels": rng.integers(0, 2, n).astype(np.int32), "weights": np.ones(n, np.float32)}


def test_bucket_widths_specs():
  assert bucket_widths("auto", 64) == [16, 24, 32, 48, 64]
  assert bucket_widths("auto", 128) == [16, 24, 32, 48, 64, 96, 128]
  assert bucket_widths("auto", 40) == [16, 24, 32, 40]
  assert bucket_widths("off", 64) == [64]
  assert bucket_widths("32, 16,200", 64) == [16, 32, 64]  # sorted, capped at seq_len
  assert [fit_width(n, [16, 32, 64]) for n in (1, 16, 17, 64)] == [16, 16, 32, 64]
  with pytest.raises(ConfigError, match="data.buckets"):
    bucket_widths("16,x", 64)
  c = base_config()
  c.data.buckets = "sixteen"
  with pytest.raises(ConfigError, match="data.buckets"):
    validate(c, 1)


def test_epoch_sees_every_row_once_in_bucketed_batches():
  rows = synthetic_rows(96, 64)
  widths = (16, 24, 32, 48, 64)
  data = ClassificationData(None, ["0", "1"], rows, rows, batch_size=8, seed=3,
                            widths=widths, sort_window=4)
  lengths = row_lengths(rows)
  seen, padded = [], 0
  for step in range(12):  # one epoch
    idx = data.rows_for_step(step)
    b = data.train_batch(step)
    width = b["inputs"].shape[1]
    assert width == fit_width(int(lengths[idx].max()), widths)
    np.testing.assert_array_equal(b["inputs"], rows["inputs"][idx, :width])
    assert (rows["attention_mask"][idx, width:] == 0).all()  # only padding was cut
    seen.extend(idx.tolist())
    padded += width * 8
  assert sorted(seen) == list(range(96))
  # grouping by length within windows pads less than random batches cut to the same widths
  plain = ClassificationData(None, ["0", "1"], rows, rows, batch_size=8, seed=3, widths=widths)
  assert padded < sum(plain.train_batch(s)["inputs"].shape[1] * 8 for s in range(12))
  # a pure function of (seed, step): a rebuilt object (a resumed run) gives the same batches
  again = ClassificationData(None, ["0", "1"], rows, rows, batch_size=8, seed=3,
                             widths=widths, sort_window=4)
  np.testing.assert_array_equal(again.train_batch(7)["inputs"], data.train_batch(7)["inputs"])
  with pytest.raises(DataError, match="sort_window"):
    plain.restore(data.state(5), 5)


def test_dev_batches_bucketed_cover_every_row_once():
  rows = synthetic_rows(21, 32, seed=1)
  data = ClassificationData(None, ["0", "1"], rows, rows, batch_size=4, seed=0,
                            widths=(16, 32))
  vb = data.val_batches()
  assert sum(float(b["weights"].sum()) for b in vb) == 21
  got = sorted(int(x) for b in vb for x in (b["labels"] * 100 + b["inputs"][:, 1])[
      b["weights"] > 0])
  want = sorted((rows["labels"] * 100 + rows["inputs"][:, 1]).tolist())
  assert got == want
  assert {b["inputs"].shape[1] for b in vb} <= {16, 32}


def test_cut_batch_gives_the_padded_batch_logits_and_loss():
  model = BERT(tiny_bert_cfg(max_seq_len=32), head="cls", rngs=nnx.Rngs(0))
  rows = synthetic_rows(8, 32, seed=2)
  rows["attention_mask"][:, 10:] = 0  # every row fits width 16
  rows["inputs"] *= rows["attention_mask"]
  cut = cut_to_width(rows, fit_width(int(row_lengths(rows).max()), [16, 32]))
  assert cut["inputs"].shape[1] == 16

  def run(b, rng=None):  # dropout is 0 in the tiny config: deterministic
    return model(b["inputs"], token_type_ids=b["token_type_ids"],
                 attention_mask=b["attention_mask"])
  # masked keys get exactly zero attention weight; what differs is only the length of the
  # softmax/matmul reductions over zeros, so f32 results agree to a few ulps of O(1) logits
  np.testing.assert_allclose(np.asarray(run(cut)), np.asarray(run(rows)), atol=1e-5)
  fwd = lambda input_ids, rng=None, **kw: model(input_ids, **kw)  # noqa: E731
  full_loss = cls_loss(fwd, rows, None)[0]
  cut_loss = cls_loss(fwd, cut, None)[0]
  np.testing.assert_allclose(float(cut_loss), float(full_loss), rtol=1e-5)


def test_first_fit_decreasing_places_every_text_without_overlap():
  lengths = np.random.default_rng(0).integers(3, 40, 50)
  row_N, offset_N = first_fit_decreasing(lengths, 64)
  used = np.zeros((row_N.max() + 1, 64), int)
  for r, o, n in zip(row_N, offset_N, lengths):
    used[r, o:o + n] += 1
    assert o + n <= 64
  assert used.max() == 1 and used.sum() == lengths.sum()
  # FFD needs at most 11/9 of the fewest rows (+ 6/9): here within one row of the bound
  assert row_N.max() + 1 <= int(np.ceil(lengths.sum() / 64 * 11 / 9)) + 1
  with pytest.raises(ValueError, match="does not fit"):
    first_fit_decreasing(np.array([65]), 64)


def test_pack_shapes_and_the_fewest_tokens_choice():
  widths = [16, 24, 32, 48, 64]
  shapes = [(s.rows, s.width) for s in pack_shapes(widths, 32)]
  counts = (2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32)  # steps of at most 25%
  assert shapes == ([(1, w) for w in widths] + [(r, 64) for r in counts]
                    + [(32, w) for w in widths[:-1]])
  assert [s.rows for s in pack_shapes([64], 5)] == [1, 2, 3, 4, 5]
  assert [(s.rows, s.width) for s in pack_shapes([16, 64], 1)] == [(1, 16), (1, 64)]

  def pick(lengths, max_rows=32):  # the one batch's shape
    plans = plan_batches(np.array(lengths), widths, max_rows, 32)
    assert len(plans) == 1 and sorted(plans[0].texts) == list(range(len(lengths)))
    return plans[0].shape
  assert pick([9]) == PackShape(1, 16)  # a lone short text stays narrow
  assert pick([9, 12, 20]) == PackShape(1, 48)  # three texts in one row
  assert pick([15] * 32) == PackShape(8, 64)  # 4 per row of 64
  assert pick([15] * 31 + [50]) == PackShape(10, 64)  # 9 rows needed, 10 compiled
  assert pick([40] * 32) == PackShape(32, 48)  # one per row, narrower than 64


def test_plan_batches_cuts_rows_into_batches_of_one_shape():
  """A file's texts: every text in exactly one batch, each batch within its limits, and all
  batches but the last of one shape (one program)."""
  lengths = np.random.default_rng(1).integers(3, 60, 500)
  plans = plan_batches(lengths, [16, 32, 64], 16, 16 * 64 // 2)
  assert sorted(np.concatenate([p.texts for p in plans]).tolist()) == list(range(500))
  assert {p.shape for p in plans[:-1]} == {PackShape(16, 64)}
  for p in plans:
    used = np.zeros((p.shape.rows, p.shape.width), int)
    for r, o, n in zip(p.row, p.offset, lengths[p.texts]):
      used[r, o:o + n] += 1
    assert used.max() == 1
  assert lengths.sum() / sum(p.shape.rows * p.shape.width for p in plans) > 0.9  # tight
  few = plan_batches(np.full(10, 30), [64], 16, 4)  # at most 4 texts per batch
  assert [len(p.texts) for p in few] == [4, 4, 2]


def test_packed_texts_give_the_padded_logits_and_mean_pooled_embeddings():
  """Texts packed several to a row (each its own segment, positions from 0, token types
  kept) through `packed_heads`: the class probabilities and L2-normalised mean embeddings of
  the same texts padded one per row (f32, atol 1e-5: only reduction lengths differ)."""
  import jax
  from lmos_jax.inference.predict import packed_heads
  model = BERT(tiny_bert_cfg(max_seq_len=32), head="cls", rngs=nnx.Rngs(0))
  rows = synthetic_rows(9, 32, seed=4)
  rows["token_type_ids"] = (np.arange(32)[None, :] >= 3) * rows["attention_mask"]  # pairs
  lengths = row_lengths(rows)
  (plan,) = plan_batches(lengths, [16, 32], 12, 12)
  assert plan.shape.rows < 9  # several texts share rows
  b = pack_texts({k: v[plan.texts] for k, v in rows.items()}, lengths[plan.texts],
                 plan.shape, plan.row, plan.offset, 12)
  order = np.argsort(plan.texts)
  x_RWD = model.encode(b["inputs"], token_type_ids=b["token_type_ids"],
                       position_ids=b["position_ids"], segment_ids=b["segment_ids"])
  probs, emb = packed_heads(model, x_RWD, b["cls_index"], b["text_index"])
  want = jax.nn.softmax(model(rows["inputs"], token_type_ids=rows["token_type_ids"],
                              attention_mask=rows["attention_mask"]), axis=-1)
  np.testing.assert_allclose(np.asarray(probs)[:9][order], np.asarray(want), atol=1e-5)
  h = np.asarray(model.encode(rows["inputs"], token_type_ids=rows["token_type_ids"],
                              attention_mask=rows["attention_mask"]))
  m = rows["attention_mask"][..., None]
  ref = (h * m).sum(1) / m.sum(1)
  np.testing.assert_allclose(np.asarray(emb)[:9][order], ref / np.linalg.norm(ref, axis=-1,
                                                                      keepdims=True), atol=1e-5)
  assert (b["text_index"][b["segment_ids"] == 0] == 12).all()  # padding belongs to no text


def test_epochs_become_steps(tmp_path):
  train = tmp_path / "train.tsv"
  train.write_text("sentence\tlabel\n" + "".join(f"s{i}\t{i % 2}\n" for i in range(70)) + "\n")
  c = base_config()
  c.task, c.data.train = "cls", str(train)
  c.train.batch_size, c.train.steps, c.train.epochs = 16, 0, 2.0
  c.train.eval_every, c.train.ckpt_every = 0, 3
  resolve_epochs(c)
  assert c.train.steps == 9 and c.train.eval_every == 9 and c.train.ckpt_every == 3  # 140/16
  c.data.max_train, c.train.steps, c.train.epochs = 32, 0, 1.0
  resolve_epochs(c)
  assert c.train.steps == 2
  c.data.train = str(tmp_path / "missing.tsv")
  with pytest.raises(DataError, match="data.train"):
    resolve_epochs(c)
  lm = base_config()
  lm.train.epochs = 1.0
  with pytest.raises(ConfigError, match="train.epochs"):
    validate(lm, 1)
