"""The answer policy's two thresholds for `lmos serve`, chosen on BANKING77's dev set.

  intent threshold:    the dev questions' top-intent probabilities; a question counts as
                       right when that intent is its gold intent. The threshold is the lowest
                       probability at which the accepted questions are right >= --template-target
                       of the time (lmos_jax.apps.service.choose_threshold).
  retrieval threshold: a stand-in knowledge base of the training questions (each labelled
                       with its intent, as a real knowledge base's answers belong to one intent
                       each); each dev question's best match by cosine of the finetuned
                       encoder's sentence embeddings counts as right when the matched question's
                       intent is the dev question's. Same rule, --retrieval-target.

It prints accuracy, the share of dev questions each threshold accepts, and what the full policy
does on dev with the answer bank given (template / retrieval / handoff shares and their
precision), then writes WORKDIR/answer_thresholds.json (refused if present, unless --force),
which `lmos serve --workdir WORKDIR` reads.

Run: python3 experiments/banking77_thresholds.py --workdir runs/banking77 \
       --answers experiments/banking77_answers.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from lmos_jax.apps.retrieval import top_k_cosine
from lmos_jax.apps.service import THRESHOLDS_FILE, choose_threshold, read_answers
from lmos_jax.config.datadir import data_file
from lmos_jax.data.encoder import read_tsv
from lmos_jax.inference.predict import batch_widths, classify_embed_rows, load_classifier


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--answers", default="experiments/banking77_answers.jsonl")
  ap.add_argument("--train", default=data_file("apps/banking77/train.tsv"))
  ap.add_argument("--dev", default=data_file("apps/banking77/dev.tsv"))
  ap.add_argument("--template-target", type=float, default=0.97,
                  help="precision template answers must reach on dev")
  ap.add_argument("--retrieval-target", type=float, default=0.90,
                  help="precision retrieved answers must reach on dev")
  ap.add_argument("--batch-size", type=int, default=64)
  ap.add_argument("--force", action="store_true", help="overwrite answer_thresholds.json")
  args = ap.parse_args()
  out = Path(args.workdir) / THRESHOLDS_FILE
  if out.exists() and not args.force:
    raise SystemExit(f"{out} exists; --force to overwrite it")
  clf = load_classifier(args.workdir)
  widths = batch_widths(clf.cfg)
  dev, train = read_tsv(args.dev, field="--dev"), read_tsv(args.train, field="--train")
  templates = read_answers(args.answers, clf.labels)
  start = time.perf_counter()
  probs_NC, emb_ND = classify_embed_rows(clf, dev.text_a, None, args.batch_size, widths)
  _, kb_MD = classify_embed_rows(clf, train.text_a, None, args.batch_size, widths)
  seconds = time.perf_counter() - start
  gold = np.array([clf.labels.index(l) for l in dev.labels])
  pred, conf = probs_NC.argmax(1), probs_NC.max(1)
  intent_ok = pred == gold
  scores_N1, idx_N1 = top_k_cosine(kb_MD, emb_ND, 1)
  kb_label = np.array([clf.labels.index(l) for l in train.labels])
  top1, retrieval_ok = scores_N1[:, 0], kb_label[idx_N1[:, 0]] == gold
  t_intent = choose_threshold(conf, intent_ok, args.template_target)
  t_retrieval = choose_threshold(top1, retrieval_ok, args.retrieval_target)

  n = len(gold)
  print(f"{n} dev questions, {len(kb_label)} training questions embedded in {seconds:.1f} s")
  print(f"intent accuracy {intent_ok.mean():.4f}; retrieval top-1 intent accuracy "
        f"{retrieval_ok.mean():.4f}")
  acc_i = conf >= t_intent
  acc_r = top1 >= t_retrieval
  print(f"intent threshold {t_intent:.4f}: accepts {acc_i.mean():.1%} of dev, precision "
        f"{intent_ok[acc_i].mean():.4f} (target {args.template_target})")
  print(f"retrieval threshold {t_retrieval:.4f}: accepts {acc_r.mean():.1%} of dev, precision "
        f"{retrieval_ok[acc_r].mean():.4f} (target {args.retrieval_target})")
  has_t = np.array([clf.labels[p] in templates for p in pred])
  src_t = acc_i & has_t
  src_r = ~src_t & acc_r
  print(f"policy on dev with {len(templates)} templates: template {src_t.mean():.1%} "
        f"(right {intent_ok[src_t].mean() if src_t.any() else float('nan'):.4f}), retrieval "
        f"{src_r.mean():.1%} (right {retrieval_ok[src_r].mean() if src_r.any() else float('nan'):.4f}), "
        f"handoff {(~src_t & ~src_r).mean():.1%}")
  out.write_text(json.dumps({
      "intent_threshold": t_intent, "retrieval_threshold": t_retrieval,
      "template_target": args.template_target, "retrieval_target": args.retrieval_target,
      "dev": str(args.dev), "dev_accuracy": float(intent_ok.mean()),
      "accepted_intent": float(acc_i.mean()), "accepted_retrieval": float(acc_r.mean())},
      indent=1) + "\n")
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
