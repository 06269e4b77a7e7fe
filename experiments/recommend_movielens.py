"""Next-item recommendation on MovieLens 100K: the configs/movielens.py variants against the
popularity floor, on the dev split (each user's second-to-last film; the last is the test
target, kept back).

Each variant is trained by the real command, `lmos train --config configs/movielens.py:V
--workdir OUT/V`, in a fresh subprocess timed from launch to exit (the text encoder's pass
over the 1,682 film texts and every compile included). Then each is scored here with the
code `lmos recommend` uses (lmos_jax.inference.recommend): the history is the training
interactions, and the dev film is ranked
  - among itself + the user's 100 sampled negatives (dev_negatives.tsv; HR@10, NDCG@10), and
  - among every film outside the user's history ("full": HR@10, NDCG@10),
for all 943 users, for the users whose dev film has fewer than 5 training interactions
("cold"; few on this split, so their figures are noisy) and fewer than 20 ("rare"). Ties
count against the target. With --reuse, variants whose workdir exists are scored without
training again (their wall time read from the workdir's wall_time.jsonl).

Run: python3 experiments/recommend_movielens.py [--variants seq,text,hybrid] [--out DIR]
     [--data DIR] [--set train.steps=300 ...]
Results: OUT/recommend_movielens.json and the table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
COLD = 5  # a dev film with fewer training interactions is "cold"
RARE = 20  # ... and "rare" with fewer than this many (a larger group than the cold one)


def train_variant(variant: str, workdir: Path, overrides: list[str], env: dict) -> float:
  """Wall seconds of `lmos train` for one variant, launch to exit (a fresh workdir)."""
  cmd = [sys.executable, "-m", "lmos_jax.cli", "train", "--config",
         f"{ROOT / 'configs/movielens.py'}:{variant}", "--workdir", str(workdir),
         "--config.train.progress=False", *[f"--config.{o}" for o in overrides]]
  t0 = time.perf_counter()
  subprocess.run(cmd, check=True, env=env)
  return time.perf_counter() - t0


def dev_split(data: Path, catalogue):
  """(users, histories, dev targets, negatives) in catalogue rows."""
  from lmos_jax.data.interactions import read_candidates, read_histories, read_targets
  index = catalogue.index()
  base = data / "apps/movielens100k"
  hist = read_histories([base / "interactions_train.tsv"], index)
  dev = read_targets(base / "dev.tsv", index)
  neg = read_candidates(base / "dev_negatives.tsv", index)
  users = sorted(dev, key=lambda u: int(u) if u.isdigit() else u)
  return users, [hist[u] for u in users], [dev[u] for u in users], [neg[u] for u in users]


def metrics(scores_UN: np.ndarray, split, groups: dict[str, np.ndarray]) -> dict[str, float]:
  """HR@10 and NDCG@10, sampled and full, for all users and each group (a user mask)."""
  from lmos_jax.inference.recommend import hit_ndcg, leave_one_out
  _, hist, targets, negs = split
  ranks = leave_one_out(scores_UN, hist, targets, negs)
  out = {}
  for kind in ("sampled", "full"):
    for who, sel in (("all", slice(None)), *groups.items()):
      hr, ndcg = hit_ndcg(ranks[kind][sel], 10)
      out[f"{kind}_{who}_hr10"], out[f"{kind}_{who}_ndcg10"] = hr, ndcg
  return out


def print_table(rows: dict[str, dict], sizes: dict[str, int], users: int) -> None:
  print(f"\nMovieLens 100K dev, {users} users; {sizes['cold']} dev films are cold (< {COLD} "
        f"training interactions), {sizes['rare']} rare (< {RARE}); HR@10 / NDCG@10")
  print("| variant | 100 negatives | full ranking | cold, 100 neg. | rare, 100 neg. | "
        "rare, full | train wall |")
  print("|---|---|---|---|---|---|---|")
  for name, r in rows.items():
    cell = lambda k: f"{r[k + '_hr10']:.3f} / {r[k + '_ndcg10']:.3f}"  # noqa: E731
    wall = f"{r['wall_s']:.0f} s" if "wall_s" in r else "-"
    print(f"| {name} | {cell('sampled_all')} | {cell('full_all')} | {cell('sampled_cold')} | "
          f"{cell('sampled_rare')} | {cell('full_rare')} | {wall} |")


def recorded_wall(workdir: Path) -> float:
  """Seconds of every `lmos train` invocation recorded in the workdir (resumes summed)."""
  rows = (workdir / "wall_time.jsonl").read_text().splitlines()
  return sum(json.loads(r)["wall"] for r in rows if r.strip())


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--variants", default="seq,text,hybrid")
  ap.add_argument("--out", default="runs/recommend_movielens")
  ap.add_argument("--data", default=None, help="the datasets folder (default $LMOS_DATA_DIR)")
  ap.add_argument("--set", action="append", default=[],
                  help="a config override for every variant, e.g. train.steps=300")
  ap.add_argument("--reuse", action="store_true",
                  help="score variants already trained in --out instead of refusing them")
  args = ap.parse_args()
  from lmos_jax.config.datadir import data_dir
  from lmos_jax.inference.recommend import load_recommender, popularity_scores
  data = data_dir(args.data)
  env = {**os.environ, "LMOS_DATA_DIR": str(data)}
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  rows, split, groups = {}, None, {}
  for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
    wd = out / variant
    if wd.exists() and not args.reuse:
      raise SystemExit(f"{wd} exists: pass a fresh --out (a timed run starts from nothing) "
                       "or --reuse to score it as it is")
    wall = recorded_wall(wd) if wd.exists() else train_variant(variant, wd, args.set, env)
    rec = load_recommender(wd)
    if split is None:
      split = dev_split(data, rec.catalogue)
      target_counts = np.asarray([0, *rec.catalogue.counts])[np.asarray(split[2])]
      groups = {"cold": target_counts < COLD, "rare": target_counts < RARE}
      rows["popularity"] = metrics(popularity_scores(rec.catalogue, len(split[0])), split,
                                   groups)
    rows[variant] = {**metrics(rec.scores(split[1]), split, groups), "wall_s": wall}
    print(f"{variant}: {json.dumps({k: round(v, 4) for k, v in rows[variant].items()})}",
          flush=True)
  sizes = {k: int(v.sum()) for k, v in groups.items()}
  print_table(rows, sizes, len(split[0]))
  (out / "recommend_movielens.json").write_text(json.dumps(
      {"rows": rows, "users": len(split[0]), "group_sizes": sizes, "overrides": args.set},
      indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
