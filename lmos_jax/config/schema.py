"""The one config schema: every key a run may set, with its default and type.

Config files start from `base_config()` and change fields; `validate` compares a loaded
config against this schema so a typo or a wrong type fails before anything compiles.
"""

from __future__ import annotations

import math
import types

import ml_collections

# The special tokens lmos adds to the tokenizers it builds, per choice of 'data.specials'
# (role, token). 'lm' (BPE, and char/byte when the data has several documents): EOS joins
# documents, PAD fills packing gaps, BOS is reserved. 'bert', always added: [MASK] for
# masked-LM pretraining and the [CLS] ... [SEP] [PAD] framing a classifier finetune of the
# same run needs; [SEP] also joins documents. Declared with the choices, so `validate` knows
# how many ids each set takes (a BPE vocabulary holds 256 bytes and them).
LMOS_SPECIALS = (("eos", "<|endoftext|>"), ("pad", "<|pad|>"), ("bos", "<|bos|>"))
BERT_SPECIALS = (("pad", "[PAD]"), ("unk", "[UNK]"), ("cls", "[CLS]"), ("sep", "[SEP]"),
                 ("mask", "[MASK]"))
SPECIAL_SETS = types.MappingProxyType({"lm": LMOS_SPECIALS, "bert": BERT_SPECIALS})


def special_set(choice: str, task: str) -> str:
  """Config 'data.specials' (a validated choice): 'auto' is 'bert' for masked-LM
  pretraining, else 'lm'."""
  if choice == "auto":
    return "bert" if task == "mlm" else "lm"
  return choice


# The allowed values of every enumerated field, declared once: `validate` checks them and the
# code that dispatches on a field reads its tuple from here.
CHOICES = types.MappingProxyType({
    "task": ("lm", "cls", "mlm", "rec"),
    "model.arch": ("gpt", "bert", "rec"),
    "model.item_repr": ("id", "text", "hybrid"),
    "model.head": ("auto", "mlm", "cls", "none"),
    "model.pooling": ("cls", "mean"),
    "model.pos_emb": ("learned", "rope", "none"),
    "model.norm": ("layernorm", "rmsnorm"),
    "model.mlp": ("gelu", "gelu_exact", "swiglu"),
    "model.remat": ("none", "full", "dots", "dots_no_batch", "save_attn_out"),
    "model.attention_impl": ("auto", "blocked", "xla", "cudnn"),
    "data.source": ("embedded", "text", "files", "hf"),
    "data.format": ("", "text", "json", "jsonl", "parquet", "csv", "tsv"),
    "data.tokenizer": ("byte", "char", "bpe", "pretrained"),
    "data.specials": ("auto", *SPECIAL_SETS),
    "data.batching": ("random", "windows", "packed"),
    "train.schedule": ("constant", "warmup_cosine", "warmup_linear", "rsqrt", "wsd",
                       "lr_range"),
    "train.precision": ("fp32", "bf16_matmul", "bf16", "bf16_full", "auto"),
    "train.nonfinite": ("skip", "stop"),
    "train.best_mode": ("min", "max"),
    "peft.method": ("full", "lora", "adapters", "adalora"),
    "prune.method": ("none", "alpha", "magnitude", "global", "nm"),
    "prune.schedule": ("oneshot", "gradual"),
    "quant.qat": ("none", "int8", "int4"),
    "mesh.cpu_allocator": ("auto", "retain", "system"),
    "mesh.opt_state": ("auto", "sharded", "replicated"),
})

# The mesh's axes, in order; the `mesh` block sets each one's size.
MESH_AXES = ("data", "fsdp", "tensor")

# The fields one entry of `data.mixture` may set (each defaults to the `data` block's value).
SPEC_FIELDS = ("source", "path", "format", "text_field", "hf_name", "hf_config", "hf_split",
               "hf_val_split", "val_path", "weight")


def default_t_final(total_steps: int) -> int:
  """`peft.t_final`=0 means AdaLoRA's last 10% of the steps at the target budget."""
  return max(1, math.ceil(0.1 * total_steps))


def default_prune_end(total_steps: int) -> int:
  """`prune.end_step`=0 means gradual pruning ends at 80% of the steps: the last 20% train
  the pruned network at its final sparsity (and lr) to recover."""
  return max(1, int(0.8 * total_steps))


def base_config() -> ml_collections.ConfigDict:
  """Defaults for a tiny decoder trained on the embedded corpus."""
  c = ml_collections.ConfigDict()
  # lm (decoder pretraining) | cls (sequence classification) | mlm | rec (next item)
  c.task = "lm"
  c.seed = 0
  c.plan = ""  # a plan.json of `lmos plan/tune --write`: its overrides apply at the start

  c.model = ml_collections.ConfigDict()
  m = c.model
  m.arch = "gpt"
  m.vocab_size = 0  # 0: taken from the tokenizer
  m.num_layers = 2
  m.num_heads = 4
  m.num_kv_heads = 0  # 0: same as num_heads (multi-head); fewer: grouped-query
  m.d_model = 128
  m.d_ff = 0  # 0: 4 * d_model (gelu) or the Llama rule (swiglu)
  m.max_seq_len = 128
  m.pos_emb = "learned"  # learned | rope | none
  m.rope_theta = 10000.0
  m.norm = "layernorm"  # layernorm | rmsnorm
  m.norm_eps = 1e-5
  m.mlp = "gelu"  # gelu (tanh) | gelu_exact | swiglu
  m.use_bias = True
  m.tie_embeddings = True
  m.dropout = 0.0
  m.scan_layers = True
  m.remat = "none"  # none | full | dots | dots_no_batch | save_attn_out
  m.attention_impl = "auto"  # auto (blocked on CPU, fused elsewhere) | blocked | xla | cudnn
  m.init_std = 0.02
  m.type_vocab_size = 2  # bert: token-type (segment) embeddings
  m.num_labels = 0  # bert: >0 adds the sequence-classification head instead of MLM
  m.head = "auto"  # bert: auto (cls if num_labels else mlm) | mlm | cls | none (encoder)
  # bert classifier's sentence vector: cls (BERT's pooler on [CLS]; exports to HF
  # BertForSequenceClassification) | mean (of the text's tokens, sentence-transformers style)
  m.pooling = "cls"
  # Weights to start from: a Hugging Face dir (config.json + *.safetensors) or an lmos
  # workdir (its latest params); heads the source lacks (pooler, classifier) start fresh
  m.init_from = ""
  # arch rec (task rec): items represented by id | text (a frozen sentence encoder's vectors
  # of each item's text through a trained projection) | hybrid (both, summed)
  m.item_repr = "id"
  m.text_encoder = ""  # rec text/hybrid: a Hugging Face encoder folder; empty: MiniLM-L6
  m.text_dim = 0  # rec text/hybrid: the encoder's width (0: taken from the encoder)
  m.id_dropout = 0.0  # rec hybrid: share of items whose id part is dropped in each step

  c.data = ml_collections.ConfigDict()
  d = c.data
  d.source = "embedded"  # embedded | text (whole files) | files (text/json/parquet/csv) | hf
  d.path = ""  # file or glob (comma-separated allowed); hf: data_files for the builder
  d.format = ""  # files: text | json | jsonl | parquet | csv | tsv; empty: from the extension
  d.text_field = "text"  # column holding the documents (files/hf)
  d.hf_name = ""  # hf: datasets.load_dataset name, local dataset dir, or builder (json, ...)
  d.hf_config = ""  # hf: the dataset's config name
  d.hf_split = "train"
  d.hf_val_split = ""  # hf: a validation split; empty: the tail val_fraction of documents
  d.val_path = ""  # text/files: validation files; empty: the tail val_fraction
  d.mixture = ()  # dicts of the source fields above + weight; empty: the single source
  d.tokenizer = "byte"  # byte | char | bpe (trained, cached in WORKDIR/tokenizer) | pretrained
  d.tokenizer_path = ""  # pretrained: tokenizer.json, HF tokenizer dir or lmos workdir;
  # empty: the tokenizer of model.init_from (an HF folder or the workdir of an lmos run)
  # Special tokens of the byte/char/bpe tokenizers lmos builds: lm (<|endoftext|> <|pad|>
  # <|bos|>) | bert ([PAD] [UNK] [CLS] [SEP] [MASK]: masked-LM pretraining, and what a
  # classifier finetune from the run needs) | auto (bert for task mlm, else lm)
  d.specials = "auto"
  d.bpe_vocab_size = 4096
  d.batching = "random"  # random windows | windows (EOS-joined, per epoch) | packed (first-fit)
  d.prefetch = 4  # batches produced ahead in a background thread; 0: inline
  d.streaming = False  # files/hf: stream documents (windows/packed) instead of loading all
  d.shuffle_buffer = 10_000  # streaming: seeded shuffle buffer, reseeded each epoch; 0: off
  d.seq_len = 128
  d.val_fraction = 0.1
  d.mlm_prob = 0.15  # task mlm: share of tokens picked (80% [MASK], 10% random, 10% kept)
  d.max_chars = 4_000_000  # cap on the embedded corpus (deterministic prefix)
  # task=cls: TSV files with a header naming a text column and a label column
  d.train = ""  # e.g. data/sst2/train.tsv (header: sentence<TAB>label, any order)
  d.dev = ""  # evaluated in full at every eval step
  d.text_b = ""  # optional second-sentence column name for sentence pairs
  d.labels = ""  # comma-separated label set; empty: sorted distinct labels of data.train
  d.max_train = 0  # use the first N training rows (0: all)
  d.per_label = 0  # cls: N training rows per label, drawn with config 'seed' (0: all)
  # cls, rec: batches are cut to the narrowest of these widths holding their longest row
  # (exact: only padding is cut). auto (16, 24, 32, 48, 64, 96, ... up to seq_len) | off |
  # '16,32,64'
  d.buckets = "auto"
  d.sort_window = 64  # cls, rec: rows grouped by length within windows of this many batches
  # (0: off)
  # task=rec: data.train holds interactions (user<TAB>item<TAB>timestamp), data.dev each
  # user's held-out next item (user<TAB>item), and this the items (item<TAB>title<TAB>genres)
  d.catalogue = ""

  c.train = ml_collections.ConfigDict()
  t = c.train
  t.batch_size = 16  # global batch, in sequences
  t.microbatches = 1  # gradient accumulation inside one step
  t.steps_per_call = 1  # optimizer steps per jitted call (lax.scan): less dispatch per step
  t.steps = 300
  t.epochs = 0.0  # cls: > 0 sets train.steps to this many passes over data.train
  t.lr = 3e-3
  t.schedule = "warmup_cosine"  # constant | warmup_cosine | warmup_linear | rsqrt | wsd
  # | lr_range (exponential from lr * min_lr_ratio up to lr: the range test of `lmos tune`)
  t.warmup_steps = 30
  t.min_lr_ratio = 0.1
  t.decay_fraction = 0.2  # wsd: share of steps spent decaying at the end
  t.weight_decay = 0.1
  t.decay_embeddings = False
  t.decay_norms_and_biases = False
  t.l2 = 0.0  # L2 penalty added to the loss (distinct from decoupled weight decay)
  # training targets (1 - a) one-hot + a / classes (lm, mlm, cls, rec); eval loss stays plain
  t.label_smoothing = 0.0
  t.grad_clip = 1.0  # global-norm clip; 0 turns it off
  t.layer_decay = 1.0  # layer-wise lr decay: block i of L gets decay**(L - i), the embeddings
  # decay**(L + 1), heads and final norm the full lr (1: off)
  t.b1 = 0.9
  t.b2 = 0.99
  t.eps = 1e-8
  t.precision = "auto"  # fp32 | bf16_matmul | bf16 | bf16_full | auto
  t.eval_every = 100
  t.eval_batches = 4
  t.log_every = 10
  t.ckpt_every = 100
  t.keep_checkpoints = 3  # newest N checkpoints kept ...
  t.keep_best = 0  # ... plus the best K by best_metric (0: off; needs evals at ckpt steps)
  t.best_metric = "eval_loss"
  t.best_mode = "min"  # min | max
  t.async_checkpoint = True  # save in a background thread while training goes on
  t.nonfinite = "skip"  # skip | stop: a NaN/Inf loss or gradient skips the update; stop ends
  t.max_bad_steps = 10  # skip: end the run after this many bad steps in a row
  t.sample_tokens = 200
  t.sample_prompt = ""
  t.progress = True
  # JAX's persistent compilation cache: auto ($LMOS_COMPILE_CACHE, else ~/.cache/lmos_jax/jax),
  # off, or a directory. A second run of the same config then compiles nothing.
  t.compile_cache = "auto"

  # Finetuning method (any task): one switch, method-specific knobs below.
  c.peft = ml_collections.ConfigDict()
  pf = c.peft
  pf.method = "full"  # full | lora | adapters | adalora
  pf.target_modules = ""  # regex on Dense paths (e.g. 'attn/(query|value)$'); empty: default
  pf.trainable_extra = ""  # regex on param paths also trained (e.g. the classifier head)
  pf.rank = 8  # lora rank; adalora initial rank
  pf.alpha = 16.0  # update scale alpha / rank
  pf.dropout = 0.0  # dropout on the adapter input
  pf.adapter_size = 64  # Houlsby bottleneck width
  pf.target_rank = 4  # adalora: average rank per module at the end
  pf.t_init = 0  # adalora: steps at the full budget before pruning
  pf.t_final = 0  # adalora: final steps at the target budget (0: 10% of train.steps)
  pf.delta_t = 10  # adalora: steps between budget re-allocations
  pf.beta1 = 0.85  # adalora: EMA of sensitivity
  pf.beta2 = 0.85  # adalora: EMA of uncertainty
  pf.orth_reg = 0.1  # adalora: weight of the orthogonality penalty
  # adalora: multiplier on the lambda (singular value) updates. With P, Q orthonormal, Adam's
  # lr-sized lambda steps change the update by ~lr, sqrt(width)x less than LoRA's B steps
  pf.lambda_lr_scale = 20.0

  # Pruning while training (Dense kernels only): the masks live in the optimizer state, so
  # checkpoints carry them and a resume continues the same masks.
  c.prune = ml_collections.ConfigDict()
  pr = c.prune
  pr.method = "none"  # none | alpha (|W| >= alpha*max|W| per layer) | magnitude (per layer)
  # | global (one threshold over all kernels) | nm (N of every M inputs kept)
  pr.sparsity = 0.5  # magnitude/global: target share of zero weights, in [0, 1)
  pr.alpha = 0.1  # alpha: keep |W| >= alpha * max|W| of each layer's kernel, in (0, 1]
  pr.n = 2  # nm: weights kept ...
  pr.m = 4  # ... in every run of M consecutive inputs (2:4 by default)
  # oneshot: the masks are computed once, at begin_step, from the weights the step starts
  # from (0: the first weights, e.g. those of model.init_from) | gradual: Zhu & Gupta's cubic
  # ramp from 0 at begin_step to the target at end_step (alpha ramps alpha the same way;
  # nm is oneshot only), masks recomputed every update_every steps, never unpruning a weight
  pr.schedule = "gradual"
  # gradual from scratch: begin once the weights have structure (e.g. a third of the steps);
  # at 0 the first masks follow the random init's magnitudes
  pr.begin_step = 0
  pr.end_step = 0  # gradual: 0 is 80% of train.steps (the rest recovers at the target)
  pr.update_every = 10

  # Quantization-aware training: Dense kernels are fake-quantized (symmetric absmax) in every
  # forward pass, eval included, with straight-through gradients; params stay float.
  c.quant = ml_collections.ConfigDict()
  c.quant.qat = "none"  # none | int8 | int4
  c.quant.group_size = 0  # input weights per scale (must divide every kernel's input size);
  # 0: one scale per output channel (int4 usually wants 32 to 128)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all devices left over
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  # CPU-only hosts: XLA devices to split the host into (0: one per core when the default
  # all-data mesh can use them; 1: one multi-threaded device). Ignored on accelerators.
  c.mesh.cpu_devices = 0
  # CPU-only hosts: `retain` keeps freed host memory in the process (one glibc arena, no mmap,
  # no trim) so XLA's per-step temporaries are not page-faulted again each step; `system`
  # leaves malloc alone; `auto` retains when the per-device activations (plus the gradients
  # when every weight trains) reach 24 MiB (glibc maps every block past 32 MiB afresh).
  c.mesh.cpu_allocator = "auto"
  # The optimizer state and update of params that are replicated over the data axis (all of
  # them on a data-only mesh): `sharded` splits them over the data devices (ZeRO stage 1: each
  # device updates its part, then the params are gathered), `replicated` updates everything on
  # every device; `auto` shards when the mesh's data axis has 2+ devices and every param
  # trains (not PEFT, whose small state costs more to gather than it saves).
  c.mesh.opt_state = "auto"

  # Multi-host (jax.distributed). Empty/-1 fields come from the environment: Cloud TPU VMs and
  # SLURM are detected by jax; JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID also work.
  c.distributed = ml_collections.ConfigDict()
  di = c.distributed
  di.enabled = "auto"  # auto (on when the environment names a cluster) | on | off
  di.coordinator_address = ""  # host:port of process 0, e.g. 10.0.0.1:8476
  di.num_processes = -1
  di.process_id = -1
  di.local_device_ids = ""  # e.g. "0,1,2,3"; empty: jax's default for the platform
  di.timeout_s = 300  # every process must join within this many seconds
  di.heartbeat_timeout_s = 100  # a silent process is declared dead after this

  # Experiment tracking beyond metrics.jsonl/TensorBoard, and profiling.
  c.tracking = ml_collections.ConfigDict()
  tr = c.tracking
  tr.wandb = False
  tr.wandb_project = "lmos_jax"
  tr.wandb_entity = ""
  tr.wandb_name = ""  # empty: the workdir's name
  tr.wandb_mode = ""  # online | offline | disabled; empty: WANDB_MODE or online
  tr.wandb_tags = ""  # comma separated
  tr.profile_start_step = -1  # >= 0: jax.profiler trace from this step ...
  tr.profile_steps = 3  # ... for this many steps, into WORKDIR/profile/process_N
  return c
