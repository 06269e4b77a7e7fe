"""lmos tokenizers written as Hugging Face tokenizer files that give exactly lmos's ids.

`lmos convert --to-hf` writes tokenizer.json, tokenizer_config.json and
special_tokens_map.json so that `transformers.AutoTokenizer.from_pretrained(OUT)` alone
encodes text to the ids the model was trained on:

- pretrained and bpe tokenizers are already a `tokenizers.Tokenizer`: written as they are
  (without padding or truncation: transformers does both from its call arguments);
- char: a WordLevel model over single characters (each character its own piece), unknown
  characters mapping to id 0 as lmos's CharTokenizer does, lmos's specials after them;
- byte: a BPE model with no merges over GPT-2's byte-to-character table, so byte b is id b,
  and the specials from 256 on;
- a [MASK] that MLM appended after a vocabulary (data.encoder.MaskedTokenizer) keeps its id.

For a classifier, the post-processor is set to BERT's template with the tokenizer's own
[CLS]/[SEP] ids, which is what `encode_for_classifier` builds: `[CLS] a [SEP] (b [SEP])`
with token type 1 on the second segment.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmos_jax.config.schema import LMOS_SPECIALS
from lmos_jax.data.encoder import MaskedTokenizer
from lmos_jax.data.tokenizer import HFTokenizer, SpecialByte, SpecialChar
from lmos_jax.errors import UserError

# role (as in `tok.specials`) -> the transformers tokenizer_config key naming its token
ROLE_KEYS = {"bos": "bos_token", "eos": "eos_token", "pad": "pad_token", "cls": "cls_token",
             "sep": "sep_token", "mask": "mask_token", "unk": "unk_token"}
MASK_TOKEN = "<|mask|>"  # the token string of a [MASK] id appended after the vocabulary


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's printable stand-in character for every byte: what a ByteLevel pre-tokenizer
  turns bytes into before the model looks them up."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return chars


def special_tokens(tok) -> dict[str, str]:
  """role -> token string of every special id the tokenizer has."""
  if isinstance(tok, MaskedTokenizer):
    return {**special_tokens(tok.base), "mask": MASK_TOKEN}
  if isinstance(tok, HFTokenizer):
    return {role: tok.tok.id_to_token(i) for role, i in tok.specials.items()}
  names = dict(LMOS_SPECIALS)
  return {role: names[role] for role in tok.specials}


def to_hf_tokenizer(tok):
  """A `tokenizers.Tokenizer` that encodes text to the ids `tok.encode` gives."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

  if isinstance(tok, MaskedTokenizer):
    out = to_hf_tokenizer(tok.base)
    out.add_special_tokens([AddedToken(MASK_TOKEN, special=True, normalized=False)])
    if out.token_to_id(MASK_TOKEN) != tok.mask_id:
      raise UserError(f"the appended {MASK_TOKEN} would get id {out.token_to_id(MASK_TOKEN)}"
                      f" in a Hugging Face tokenizer, not lmos's {tok.mask_id}")
    return out
  if isinstance(tok, HFTokenizer):
    out = Tokenizer.from_str(tok.tok.to_str())
    out.no_padding()
    out.no_truncation()
    return out
  if not isinstance(tok, (SpecialChar, SpecialByte)):
    raise UserError(f"the lmos tokenizer {type(tok).__name__} has no Hugging Face "
                    "equivalent; it cannot be exported with `lmos convert --to-hf`")
  specials = special_tokens(tok)
  if isinstance(tok, SpecialChar):
    if not tok.chars:
      raise UserError("a char tokenizer with no characters cannot be written as a Hugging "
                      "Face tokenizer")
    vocab = {c: i for i, c in enumerate(tok.chars)}
    out = Tokenizer(models.WordLevel({**vocab, **{specials[r]: i for r, i in
                                                  tok.specials.items()}},
                                     unk_token=tok.chars[0]))  # unknown chars -> id 0
    out.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    out.decoder = decoders.Fuse()
  else:
    vocab = {c: b for b, c in bytes_to_unicode().items()}
    out = Tokenizer(models.BPE({**vocab, **{specials[r]: i for r, i in tok.specials.items()}},
                               []))
    out.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    out.decoder = decoders.ByteLevel()
  out.add_special_tokens([AddedToken(specials[r], special=True, normalized=False)
                          for r in sorted(tok.specials, key=tok.specials.get)])
  return out


def set_classifier_template(hf_tok, cls_token: str, sep_token: str) -> None:
  """BERT's `[CLS] A [SEP]` / `[CLS] A [SEP] B [SEP]` (B with token type 1): the rows
  `encode_for_classifier` builds, added by the tokenizer's own call."""
  from tokenizers import processors
  ids = {t: hf_tok.token_to_id(t) for t in (cls_token, sep_token)}
  hf_tok.post_processor = processors.TemplateProcessing(
      single=f"{cls_token}:0 $A:0 {sep_token}:0",
      pair=f"{cls_token}:0 $A:0 {sep_token}:0 $B:1 {sep_token}:1",
      special_tokens=list(ids.items()))


def splits_specials(tok) -> bool:
  """True when lmos encodes the text of a special token character by character (char and
  byte tokenizers): transformers must not match it as the special token then."""
  base = tok.base if isinstance(tok, MaskedTokenizer) else tok
  return not isinstance(base, HFTokenizer)


def write_hf_tokenizer(tok, out_dir: str | Path, *, model_max_length: int, classifier: bool,
                       token_type_ids: bool) -> list[str]:
  """tokenizer.json, tokenizer_config.json and special_tokens_map.json for `tok` in OUT.

  classifier: the tokenizer's call adds [CLS]/[SEP] as lmos's classification rows do.
  token_type_ids: the model takes them (BERT), so the tokenizer returns them.
  """
  out = Path(out_dir)
  hf_tok = to_hf_tokenizer(tok)
  specials = special_tokens(tok)
  if classifier:
    missing = [r for r in ("cls", "sep", "pad") if r not in specials]
    if missing:
      raise UserError(f"a classifier's tokenizer needs {missing} tokens to be exported")
    set_classifier_template(hf_tok, specials["cls"], specials["sep"])
  hf_tok.save(str(out / "tokenizer.json"))
  special_map = {ROLE_KEYS[r]: t for r, t in specials.items()}
  inputs = ["input_ids"] + (["token_type_ids"] if token_type_ids else []) + ["attention_mask"]
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
            "padding_side": "right", "truncation_side": "right",
            "clean_up_tokenization_spaces": False, "model_input_names": inputs,
            "split_special_tokens": splits_specials(tok), **special_map}
  (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
  (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
  return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
