"""Next-item recommendation: metrics, file parsing, a model that learns a synthetic world,
the frozen text vectors against transformers, and `lmos recommend`'s output files.

The synthetic world: 30 items in a ring; every user watches a run of consecutive items
(i, i+1, ...), so the next item is always the previous one + 1.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmos_jax import cli
from lmos_jax.config.loading import ConfigError
from lmos_jax.config.schema import base_config
from lmos_jax.data.errors import DataError
from lmos_jax.data.interactions import (build_rec_data, read_candidates, read_catalogue,
                                        read_histories)
from lmos_jax.inference.recommend import (hit_ndcg, leave_one_out, load_recommender,
                                          popularity_scores, rank_of)

from helpers import tiny_bert_hf_dir

ITEMS = 30


def ring_world(root, users: int = 48, length: int = 10, seed: int = 0):
  """items.tsv, train.tsv (each user's run but its last item) and dev.tsv (that last item)."""
  rng = np.random.default_rng(seed)
  (root / "items.tsv").write_text("item\ttitle\tgenres\n" + "".join(
      f"{i}\tFilm {i} ({1950 + i})\t{'Drama' if i % 2 else 'Comedy'}|Genre{i % 5}\n"
      for i in range(1, ITEMS + 1)))
  train, dev = ["user\titem\ttimestamp\n"], ["user\titem\n"]
  for u in range(users):
    start = int(rng.integers(ITEMS))
    run = [(start + k) % ITEMS + 1 for k in range(length)]
    train += [f"u{u}\t{i}\t{1000 + k}\n" for k, i in enumerate(run[:-1])]
    dev.append(f"u{u}\t{run[-1]}\n")
  (root / "train.tsv").write_text("".join(train))
  (root / "dev.tsv").write_text("".join(dev))
  return root


def rec_config(root, item_repr: str = "id", steps: int = 150, encoder: str = ""):
  c = base_config()
  c.task, c.seed = "rec", 0
  m, d, t = c.model, c.data, c.train
  m.arch, m.item_repr, m.text_encoder = "rec", item_repr, encoder
  m.num_layers, m.num_heads, m.d_model, m.max_seq_len, m.dropout = 1, 2, 32, 16, 0.0
  d.seq_len = 16
  d.train, d.dev, d.catalogue = (str(root / f) for f in ("train.tsv", "dev.tsv", "items.tsv"))
  t.batch_size, t.steps, t.lr, t.warmup_steps, t.weight_decay = 16, steps, 1e-2, 10, 0.0
  t.eval_every = t.log_every = t.ckpt_every = steps
  t.sample_tokens, t.progress = 0, False
  return c


# ---------------------------------------------------------------- metrics


def test_hit_ndcg_hand_computed():
  """Ranks 0, 3, 12 at k=10: two hits; NDCG = (1/log2(2) + 1/log2(5)) / 3."""
  hr, ndcg = hit_ndcg(np.array([0, 3, 12]), 10)
  assert hr == pytest.approx(2 / 3)
  assert ndcg == pytest.approx((1.0 + 1.0 / math.log2(5)) / 3)


def test_rank_counts_ties_against_the_target():
  s = np.array([-np.inf, 0.5, 0.9, 0.5, 0.1])
  assert rank_of(s, 2, [1, 2, 3, 4]) == 0
  assert rank_of(s, 1, [1, 2, 3, 4]) == 2  # 0.9 above, the other 0.5 tied: counted above
  assert rank_of(s, 4, [4, 1]) == 1
  assert rank_of(s, 4, [1, 2]) == 2  # a target missing from the list is still ranked


def test_leave_one_out_full_ranking_skips_the_history():
  """Full ranking is over items outside the history: a seen item scoring higher is skipped."""
  s = np.array([[-np.inf, 5.0, 4.0, 3.0, 2.0]])
  r = leave_one_out(s, [[1]], [2], [[3, 4]])
  assert r["sampled"][0] == 0 and r["full"][0] == 0
  r = leave_one_out(s, [[3]], [2], [[1, 4]])
  assert r["sampled"][0] == 1 and r["full"][0] == 1


# ---------------------------------------------------------------- files


def test_histories_sorted_by_timestamp_then_item_and_appended(tmp_path):
  (tmp_path / "items.tsv").write_text("item\ttitle\n1\ta\n2\tb\n3\tc\n10\td\n")
  index = read_catalogue(tmp_path / "items.tsv").index()
  (tmp_path / "a.tsv").write_text("user\titem\ttimestamp\nx\t10\t5\nx\t3\t5\nx\t2\t1\ny\t1\t9\n")
  (tmp_path / "b.tsv").write_text("x\t1\n")
  h = read_histories([tmp_path / "a.tsv", tmp_path / "b.tsv"], index)
  assert h == {"x": [index["2"], index["3"], index["10"], index["1"]], "y": [index["1"]]}


@pytest.mark.parametrize("text,where", [
    ("user\titem\nx\t99\n", "h.tsv:2: item '99'"),
    ("user\titem\tt\nx\t1\tsoon\n", "h.tsv:2: timestamp 'soon'"),
    ("x\n", "h.tsv:1: expected 2"),
])
def test_history_errors_name_the_line(tmp_path, text, where):
  (tmp_path / "items.tsv").write_text("item\ttitle\n1\ta\n")
  (tmp_path / "h.tsv").write_text(text)
  with pytest.raises(DataError, match=where):
    read_histories([tmp_path / "h.tsv"], read_catalogue(tmp_path / "items.tsv").index())


def test_candidate_errors_name_the_line(tmp_path):
  (tmp_path / "items.tsv").write_text("item\ttitle\n1\ta\n2\tb\n")
  (tmp_path / "c.tsv").write_text("user\tnegatives\nx\t1 2\ny\t2 7\n")
  with pytest.raises(DataError, match=r"c.tsv:3: item '7'"):
    read_candidates(tmp_path / "c.tsv", read_catalogue(tmp_path / "items.tsv").index())


def test_rec_config_errors_name_the_field(tmp_path):
  from lmos_jax.config.loading import validate
  c = rec_config(ring_world(tmp_path))
  c.model.arch = "gpt"
  with pytest.raises(ConfigError, match="model.arch"):
    validate(c, 1)
  c = rec_config(tmp_path)
  c.data.catalogue = ""
  with pytest.raises(ConfigError, match="data.catalogue"):
    validate(c, 1)
  c = rec_config(tmp_path, "hybrid")
  c.model.id_dropout = 1.0
  with pytest.raises(ConfigError, match="model.id_dropout"):
    validate(c, 1)


def test_batches_are_shifted_histories(tmp_path):
  data = build_rec_data(rec_config(ring_world(tmp_path)))
  b = data.train_batch(0)
  real = b["weights"] > 0
  assert b["inputs"].shape == (16, 16) and real.sum(1).tolist() == [8] * 16
  # the ring: every target is its input + 1 (30 wraps to 1), in catalogue rows
  ids = np.asarray((0,) + tuple(int(i) for i in data.catalogue.ids))
  assert ((ids[b["inputs"]][real] % ITEMS + 1) == ids[b["targets"]][real]).all()
  assert data.train_batch(5)["inputs"].tolist() == data.train_batch(5)["inputs"].tolist()


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def ring_run(tmp_path_factory):
  from lmos_jax.train.trainer import train
  root = ring_world(tmp_path_factory.mktemp("ring"))
  wd = root / "wd"
  last = train(rec_config(root), wd)
  return root, wd, last


def test_model_learns_the_next_item(ring_run):
  """After 150 steps the dev item (previous + 1) is ranked first for nearly every user, far
  above popularity (which knows nothing of order)."""
  root, wd, last = ring_run
  rec = load_recommender(wd)
  index = rec.catalogue.index()
  hist = read_histories([root / "train.tsv"], index)
  dev = read_histories([root / "dev.tsv"], index)
  users = list(dev)
  s = rec.scores([hist[u] for u in users])
  top1 = np.mean([int(np.argmax(s[i])) == dev[u][0] for i, u in enumerate(users)])
  assert top1 >= 0.9, last
  pop = popularity_scores(rec.catalogue, len(users))
  ranks = leave_one_out(pop, [hist[u] for u in users], [dev[u][0] for u in users],
                        [[] for _ in users])
  assert hit_ndcg(ranks["full"], 1)[0] < 0.3


def test_recommend_writes_every_candidate_in_score_order(ring_run, tmp_path, capsys):
  root, wd, _ = ring_run
  (tmp_path / "c.tsv").write_text("user\tnegatives\nu0\t3 9 20 1\nnobody\t2 5 7\n")
  out = tmp_path / "o.tsv"
  rc = cli.main(["recommend", "--workdir", str(wd), "--history", str(root / "train.tsv"),
                 str(root / "dev.tsv"), "--candidates", str(tmp_path / "c.tsv"),
                 "--output", str(out)])
  assert rc == 0
  rows = [line.split("\t") for line in out.read_text().splitlines()]
  assert [r[0] for r in rows] == ["u0", "nobody"]
  assert sorted(rows[0][1].split()) == sorted("3 9 20 1".split())
  assert sorted(rows[1][1].split()) == sorted("2 5 7".split())
  assert "1 of 2 users have no history" in capsys.readouterr().err
  # u0's ranking follows the model's scores for its train+dev history
  rec = load_recommender(wd)
  index = rec.catalogue.index()
  hist = read_histories([root / "train.tsv", root / "dev.tsv"], index)["u0"]
  s = rec.scores([hist])[0]
  assert rows[0][1].split() == sorted("3 9 20 1".split(), key=lambda i: -s[index[i]])


def test_recommend_top_k_skips_seen_items_and_refuses_overwrite(ring_run, tmp_path, capsys):
  root, wd, _ = ring_run
  out = tmp_path / "o.tsv"
  args = ["recommend", "--workdir", str(wd), "--history", str(root / "train.tsv"),
          "--output", str(out), "--k", "5"]
  assert cli.main(args) == 0
  seen = {}
  for line in (root / "train.tsv").read_text().splitlines()[1:]:
    u, i, _ = line.split("\t")
    seen.setdefault(u, set()).add(i)
  rows = dict(line.split("\t") for line in out.read_text().splitlines())
  assert rows.keys() == seen.keys()
  assert all(len(v.split()) == 5 and not set(v.split()) & seen[u] for u, v in rows.items())
  assert cli.main(args) == 2
  assert "exists" in capsys.readouterr().err


def test_recommend_unknown_candidate_is_one_line(ring_run, tmp_path, capsys):
  root, wd, _ = ring_run
  (tmp_path / "c.tsv").write_text("u0\t3 x9\n")
  rc = cli.main(["recommend", "--workdir", str(wd), "--history", str(root / "train.tsv"),
                 "--candidates", str(tmp_path / "c.tsv"), "--output", str(tmp_path / "o")])
  err = capsys.readouterr().err
  assert rc == 2 and "c.tsv:1: item 'x9'" in err and "Traceback" not in err


# ---------------------------------------------------------------- text items


def test_text_vectors_match_transformers_mean_pooling(tmp_path):
  """The frozen item vectors are the encoder's L2-normalised mean-pooled last hidden states,
  checked against transformers' BertModel (PyTorch) within 1e-4."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from lmos_jax.models.rec import text_vectors
  hf = tiny_bert_hf_dir(tmp_path / "enc")
  texts = ["Toy Story (1995) | Animation, Comedy", "Heat (1995)", "a much longer title " * 3]
  ours = text_vectors(str(hf), texts)
  tok = transformers.AutoTokenizer.from_pretrained(str(hf))
  model = transformers.BertModel.from_pretrained(str(hf), add_pooling_layer=False).eval()
  enc = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
  with torch.no_grad():
    h = model(**enc).last_hidden_state
  m = enc["attention_mask"][..., None].float()
  ref = (h * m).sum(1) / m.sum(1)
  ref = (ref / ref.norm(dim=-1, keepdim=True)).numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-4)


def test_text_model_trains_with_its_text_vectors_frozen(tmp_path):
  """A hybrid run leaves `item_text` exactly as the encoder gave it (no gradient, no weight
  decay) while the rest trains."""
  from lmos_jax.models.rec import item_text_table
  from lmos_jax.train.trainer import train
  from lmos_jax.workdir import latest_params
  root = ring_world(tmp_path)
  hf = tiny_bert_hf_dir(tmp_path / "enc")
  c = rec_config(root, "hybrid", steps=20, encoder=str(hf))
  c.train.weight_decay = 0.1
  last = train(c, root / "wd")
  assert np.isfinite(last["loss"])
  params = latest_params(root / "wd")
  texts = read_catalogue(root / "items.tsv").texts
  np.testing.assert_array_equal(np.asarray(params["item_text"]), item_text_table(str(hf), texts))
  assert load_recommender(root / "wd").scores([[1, 2, 3]]).shape == (1, ITEMS + 1)


def test_id_dropout_drops_whole_id_rows_in_training_only():
  """hybrid with id_dropout: in a training step each item row is either its full vector or
  its text part alone (about the configured share of rows); evaluation keeps every id part."""
  import jax
  from flax import nnx
  from lmos_jax.models.rec import ItemSequenceModel
  from helpers import tiny_tcfg
  n, f = 401, 8
  text = np.random.default_rng(0).normal(size=(n, f)).astype(np.float32)
  model = ItemSequenceModel(tiny_tcfg(vocab_size=n), "hybrid", text, f, id_dropout=0.3,
                            rngs=nnx.Rngs(0))
  full = np.asarray(model.item_table(np.float32))
  ids = np.asarray(model.item_embed[...])
  train = np.asarray(model.item_table(np.float32, jax.random.PRNGKey(1)))
  kept = np.isclose(train, full, atol=1e-6).all(1)
  dropped = np.isclose(train, full - ids, atol=1e-6).all(1)
  assert (kept | dropped)[1:].all()
  assert 0.2 < dropped[1:].mean() < 0.4
