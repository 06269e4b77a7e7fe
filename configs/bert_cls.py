"""A BERT sentence classifier finetuned from your own masked-LM pretraining (bert_mlm.py).

The model block is bert_mlm.py's for the same argument (`small` or `tiny`), so that run's
weights fit; point model.init_from at its workdir. The encoder starts from the workdir's
latest params, the pooler and the classifier start fresh and the MLM head is dropped (one
log line says so). The tokenizer is the source run's: data.tokenizer='pretrained' with an
empty data.tokenizer_path reads model.init_from's tokenizer.json (bert_mlm.py's BPE with
[CLS] [SEP] [PAD] [MASK] [UNK]). model.init_from may also be a Hugging Face BERT folder with
the same architecture. Data: SST-2 style TSVs (header `sentence<TAB>label`) under
$LMOS_DATA_DIR/sst2/, or set data.train and data.dev; model.num_labels must match the
label set.

Run: lmos train --config configs/bert_mlm.py --workdir runs/bert_mlm
     lmos train --config configs/bert_cls.py --workdir runs/bert_cls \
       --config.model.init_from=runs/bert_mlm
     lmos predict --workdir runs/bert_cls "a gorgeous, witty, seductive movie"
"""

import importlib.util
import math
import os
from pathlib import Path


def get_config(arg=None):
  arg = arg or "small"
  spec = importlib.util.spec_from_file_location("bert_mlm", Path(__file__).with_name(
      "bert_mlm.py"))
  mlm = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mlm)
  c = mlm.get_config(arg)  # the pretraining run's model, positions and optimizer settings
  c.task = "cls"
  m, d, t = c.model, c.data, c.train
  m.head, m.num_labels = "cls", 2
  m.init_from = ""  # required: --config.model.init_from=WORKDIR of the bert_mlm.py run
  d.source, d.tokenizer, d.tokenizer_path = "embedded", "pretrained", ""
  data_dir = os.environ.get("LMOS_DATA_DIR", "data")
  d.train, d.dev = f"{data_dir}/sst2/train.tsv", f"{data_dir}/sst2/dev.tsv"
  d.labels = ""  # sorted distinct labels of data.train
  d.seq_len = min(64, m.max_seq_len)
  t.weight_decay = 0.01
  if arg == "small":  # one epoch of the first 4000 sentences
    d.max_train, t.batch_size = 4000, 16
    t.steps = math.ceil(d.max_train / t.batch_size)
    t.schedule, t.lr, t.warmup_steps, t.min_lr_ratio = "warmup_linear", 5e-4, 25, 0.0
    t.log_every = 10
  else:  # tests: a few steps on a toy task
    d.max_train, t.batch_size, t.steps = 0, 8, 30
    t.schedule, t.lr, t.log_every = "constant", 3e-3, 1
  t.eval_every = t.ckpt_every = t.steps
  t.keep_checkpoints = 1
  return c
