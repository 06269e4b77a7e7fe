"""Tokenizers for the pipeline: char, byte, a locally trained byte-level BPE, or a pretrained
`tokenizer.json` (Hugging Face `tokenizers`), all with one interface and named special ids.

Every tokenizer exposes `vocab_size`, `encode`, `encode_batch`, `decode`, `specials` (role ->
id for bos/eos/pad/cls/sep/mask/unk where present) and `describe()` (a JSON-able dict that
`tokenizer_from_info` turns back into the same tokenizer, for generate/convert).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from lmos_jax.config.loading import ConfigError
from lmos_jax.config.schema import SPECIAL_SETS
from lmos_jax.data.errors import DataError, DataFileNotFoundError
from lmos_jax.data.text import ByteTokenizer, CharTokenizer

log = logging.getLogger("lmos_jax.data")

# How a pretrained tokenizer names each role (first match wins).
ROLE_NAMES = {
    "bos": ("<|bos|>", "<s>", "[BOS]", "<bos>", "<|begin_of_text|>"),
    "eos": ("<|endoftext|>", "</s>", "[EOS]", "<eos>", "<|end_of_text|>"),
    "pad": ("<|pad|>", "[PAD]", "<pad>"),
    "cls": ("[CLS]", "<s>", "<cls>"),
    "sep": ("[SEP]", "</s>", "<sep>"),
    "mask": ("[MASK]", "<mask>"),
    "unk": ("[UNK]", "<unk>", "<|unk|>"),
}


@dataclasses.dataclass(frozen=True)
class SpecialChar:
  """Char tokenizer plus appended special ids (vocab = chars, then the specials)."""

  base: CharTokenizer
  names: tuple[str, ...] = ()

  @property
  def chars(self) -> str:
    return self.base.chars

  @property
  def vocab_size(self) -> int:
    return self.base.vocab_size + len(self.names)

  @property
  def specials(self) -> dict[str, int]:
    return {n: self.base.vocab_size + i for i, n in enumerate(self.names)}

  def unknown_chars(self, text: str) -> list[str]:
    return self.base.unknown_chars(text)

  def unknown_message(self, unknown: list[str]) -> str:
    return self.base.unknown_message(unknown)

  def encode(self, text: str) -> np.ndarray:
    return self.base.encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [self.base.encode(t) for t in texts]

  def decode(self, ids) -> str:
    return self.base.decode([i for i in ids if int(i) < self.base.vocab_size])

  def describe(self) -> dict:
    return {"kind": "char", "chars": self.base.chars, "specials": list(self.names)}


@dataclasses.dataclass(frozen=True)
class SpecialByte:
  """UTF-8 bytes (ids 0-255) plus appended special ids from 256 on."""

  names: tuple[str, ...] = ()

  @property
  def vocab_size(self) -> int:
    return 256 + len(self.names)

  @property
  def specials(self) -> dict[str, int]:
    return {n: 256 + i for i, n in enumerate(self.names)}

  def encode(self, text: str) -> np.ndarray:
    return ByteTokenizer().encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [ByteTokenizer().encode(t) for t in texts]

  def decode(self, ids) -> str:
    return ByteTokenizer().decode([i for i in ids if int(i) < 256])

  def describe(self) -> dict:
    return {"kind": "byte", "specials": list(self.names)}


class HFTokenizer:
  """A Hugging Face `tokenizers.Tokenizer`; encode never adds specials (the pipeline does)."""

  def __init__(self, tok, kind: str):
    tok.no_padding()  # a saved tokenizer.json may pad/truncate (MiniLM's pads to 128): the
    tok.no_truncation()  # pipeline packs and windows itself and must see every token
    self.tok = tok
    self.kind = kind
    vocab = tok.get_vocab(with_added_tokens=True)
    self.specials = {}
    for role, names in ROLE_NAMES.items():
      for name in names:
        if name in vocab:
          self.specials[role] = int(vocab[name])
          break

  @property
  def vocab_size(self) -> int:
    return int(self.tok.get_vocab_size(with_added_tokens=True))

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    encs = self.tok.encode_batch_fast(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, np.int32) for e in encs]

  def decode(self, ids) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def describe(self) -> dict:
    return {"kind": self.kind, "hf_tokenizer": self.tok.to_str()}


def tokenizer_from_info(info: dict):
  """Inverse of `describe()`."""
  kind = info.get("kind", "")
  if kind == "char":
    return SpecialChar(CharTokenizer(info["chars"]), tuple(info.get("specials", ())))
  if kind == "byte":
    return SpecialByte(tuple(info.get("specials", ())))
  if "hf_tokenizer" in info:
    from tokenizers import Tokenizer
    return HFTokenizer(Tokenizer.from_str(info["hf_tokenizer"]), kind)
  raise ValueError(f"tokenizer info of kind {kind!r} is not one lmos_jax can rebuild")


def load_pretrained(path: str):
  """A `tokenizer.json`, or a directory holding one: a Hugging Face tokenizer folder, or an
  lmos workdir, whose tokenizer.json is `describe()`'s record of the run's tokenizer (so a
  run started from that workdir tokenizes exactly as it was trained)."""
  from tokenizers import Tokenizer
  p = Path(os.path.expanduser(path))
  if p.is_dir():
    p = p / "tokenizer.json"
  if not p.is_file():
    raise DataFileNotFoundError(
        f"config 'data.tokenizer_path'={path!r}: no tokenizer.json there; give a tokenizer.json "
        "file, a Hugging Face tokenizer directory or an lmos workdir holding one")
  try:
    info = json.loads(p.read_text())
  except ValueError:
    info = None
  if isinstance(info, dict) and "kind" in info and "model" not in info:  # lmos's record
    return tokenizer_from_info(info)
  try:
    tok = Tokenizer.from_file(str(p))
  except Exception as e:  # noqa: BLE001 - `tokenizers` raises a bare Exception on bad files
    raise DataError(f"config 'data.tokenizer_path'={path!r}: {p} is not a tokenizer.json "
                    f"that `tokenizers` can read ({str(e)[:200]}); give the tokenizer.json a "
                    "Hugging Face tokenizer saved") from None
  return HFTokenizer(tok, "pretrained")


def corpus_digest(docs: Iterable[str]) -> str:
  """Content hash of the training documents: the BPE cache key, so changed data retrains."""
  h = hashlib.sha256()
  for d in docs:
    b = d.encode("utf-8", errors="replace")
    h.update(len(b).to_bytes(8, "little"))
    h.update(b)
  return h.hexdigest()[:16]


def train_bpe(docs: Sequence[str], vocab_size: int, specials: str = "lm") -> HFTokenizer:
  """Byte-level BPE (GPT-2 style) trained on `docs`, with the special set's tokens at ids
  0, 1, ... For 'bert' the saved tokenizer also frames text as [CLS] a [SEP] (b [SEP]), as
  BERT's does, for users of an exported tokenizer.json; lmos's pipeline adds specials itself."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  names = [name for _, name in SPECIAL_SETS[specials]]
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=names,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
  if specials == "bert":
    ids = {n: tok.token_to_id(n) for n in ("[CLS]", "[SEP]")}
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=list(ids.items()))
  return HFTokenizer(tok, "bpe")


def bpe_cached(docs: Sequence[str], vocab_size: int, cache_dir: Path | None,
               specials: str = "lm") -> HFTokenizer:
  """Loads the BPE for these docs and size from `cache_dir` if there, else trains and saves.

  The file name carries the special set, the vocab size and a digest of the documents, so a
  resumed run reuses exactly the tokenizer it started with and changed data never reuses a
  stale one.
  """
  from tokenizers import Tokenizer
  if cache_dir is None:
    return train_bpe(docs, vocab_size, specials)
  kind = "bpe" if specials == "lm" else f"bpe_{specials}"
  path = Path(cache_dir) / f"{kind}_v{vocab_size}_{corpus_digest(docs)}.json"
  if path.is_file():
    return HFTokenizer(Tokenizer.from_file(str(path)), "bpe")
  tok = train_bpe(docs, vocab_size, specials)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(f".tmp{os.getpid()}")
  tok.tok.save(str(tmp))
  os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
  log.info("trained byte-level BPE (%d ids) and cached it at %s", tok.vocab_size, path)
  return tok


def build_tokenizer(kind: str, train_docs: Sequence[str], *, need_specials: bool,
                    tokenizer_path: str = "", bpe_vocab_size: int = 0,
                    cache_dir: Path | None = None, specials: str = "lm"):
  """The tokenizer named by config 'data.tokenizer', with the special set `specials`
  ('lm' or 'bert', see SPECIAL_SETS; a pretrained tokenizer keeps its own).

  char/byte get lm's EOS/PAD/BOS appended only when `need_specials` (several documents or
  packing), so a single-text run keeps the bare 256-byte (or corpus-character) vocabulary; the 'bert' set is
  always added (a classifier finetune needs it whatever the pretraining data was).
  """
  table = SPECIAL_SETS[specials]
  names = tuple(role for role, _ in table) if need_specials or specials != "lm" else ()
  if kind == "char":
    return SpecialChar(CharTokenizer.fit("".join(train_docs)), names)
  if kind == "byte":
    return SpecialByte(names)
  if kind == "bpe":
    if bpe_vocab_size < 256 + len(table):
      raise ConfigError(f"config 'data.bpe_vocab_size'={bpe_vocab_size} must be at least "
                        f"{256 + len(table)} (256 bytes + the {specials} special tokens)")
    return bpe_cached(train_docs, bpe_vocab_size, cache_dir, specials)
  if kind == "pretrained":
    return load_pretrained(tokenizer_path)
  raise ConfigError(f"config 'data.tokenizer'={kind!r}: expected byte, char, bpe or pretrained")


def tokenizer_fingerprint(tok) -> str:
  """What decides the ids: the vocabulary (not the file format, which changes across
  `tokenizers` versions and must not block a resume)."""
  what = (sorted(tok.tok.get_vocab(with_added_tokens=True).items()) if isinstance(tok, HFTokenizer)
          else tok.describe())
  return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def separator_id(tok) -> int:
  """The id that ends a document: EOS, or SEP for encoder tokenizers such as BERT's."""
  sp = tok.specials
  if "eos" in sp:
    return sp["eos"]
  if "sep" in sp:
    return sp["sep"]
  raise DataError("the tokenizer has no EOS or SEP token to separate documents; use a "
                  "tokenizer with one (data.tokenizer=bpe/byte/char add <|endoftext|>)")


def pad_id(tok) -> int:
  return tok.specials.get("pad", separator_id(tok))


def check_vocab(tok, model_vocab_size: int) -> None:
  """Every id the tokenizer can emit must have an embedding row."""
  if model_vocab_size and tok.vocab_size > model_vocab_size:
    raise ConfigError(f"the tokenizer has {tok.vocab_size} ids but 'model.vocab_size'="
                      f"{model_vocab_size}; raise model.vocab_size to at least "
                      f"{tok.vocab_size} or set it to 0 (taken from the tokenizer)")
