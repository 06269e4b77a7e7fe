"""`lmos serve` under concurrent load: throughput and latency with dynamic batching on and off.

For each mode the server starts as a subprocess on a free 127.0.0.1 port:
  batching on   --max-batch 32 --max-wait-ms 5 (the defaults)
  batching off  --max-batch 1  (every request is its own batch of one row)
then, for each client count N, N concurrent httpx clients (one asyncio loop in this process)
each send /v1/classify requests of one question (dev questions in turn) back to back until
the level has sent --requests requests or run --seconds, whichever comes first. Printed per N:
completed requests/s, p50/p95/p99 latency (send to response), failed requests (any status
but 200, or a transport error), and the on/off throughput ratio measured in the same run.
The server is stopped with SIGTERM and its exit status is checked (0).

Run: python3 experiments/bench_serve.py --workdir runs/banking77 [--clients 1,8,32]
       [--requests 600] [--seconds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import portpicker

ROOT = Path(__file__).resolve().parents[1]
MODES = {"on": ["--max-batch", "32", "--max-wait-ms", "5"], "off": ["--max-batch", "1"]}


def questions(dev: str, n: int = 512) -> list[str]:
  """Dev questions (the text column of a text<TAB>label TSV), else fixed samples."""
  p = Path(dev)
  if p.is_file():
    rows = [line.split("\t")[0] for line in p.read_text(encoding="utf-8").splitlines()[1:]]
    return [r for r in rows if r.strip()][:n]
  return [f"where is the card I ordered {i} days ago?" for i in range(n)]


def start(workdir: str, flags: list[str], timeout_s: float) -> tuple[subprocess.Popen, str]:
  port = portpicker.pick_unused_port()
  log = open(Path(tempfile.gettempdir()) / f"bench_serve_{port}.log", "w")
  proc = subprocess.Popen([sys.executable, "-m", "lmos_jax.cli", "serve", "--workdir", workdir,
                           "--port", str(port), "--log-level", "warning", *flags], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log, stderr=log)
  url = f"http://127.0.0.1:{port}"
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      raise SystemExit(f"lmos serve exited {proc.returncode}; see {log.name}")
    try:
      if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
        return proc, url
    except httpx.TransportError:
      pass
    time.sleep(0.5)
  proc.kill()
  raise SystemExit(f"lmos serve did not start in {timeout_s} s; see {log.name}")


async def level(url: str, texts: list[str], clients: int, requests: int, seconds: float
                ) -> dict:
  """`clients` loops sending one-question requests until `requests` sent or `seconds` up."""
  lat, failed = [], 0
  sent = 0
  stop_at = time.perf_counter() + seconds

  async def client(c: httpx.AsyncClient) -> None:
    nonlocal sent, failed
    while sent < requests and time.perf_counter() < stop_at:
      i = sent
      sent += 1
      t0 = time.perf_counter()
      try:
        r = await c.post(f"{url}/v1/classify", json={"texts": [texts[i % len(texts)]]})
        ok = r.status_code == 200
      except httpx.HTTPError:
        ok = False
      if ok:
        lat.append(time.perf_counter() - t0)
      else:
        failed += 1
  limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
  async with httpx.AsyncClient(timeout=30, limits=limits) as c:
    t0 = time.perf_counter()
    await asyncio.gather(*[client(c) for _ in range(clients)])
    wall = time.perf_counter() - t0
  ms = 1e3 * np.asarray(lat) if lat else np.zeros(1)
  return {"clients": clients, "done": len(lat), "failed": failed, "rps": len(lat) / wall,
          "p50": np.percentile(ms, 50), "p95": np.percentile(ms, 95),
          "p99": np.percentile(ms, 99)}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--workdir", default="runs/banking77")
  ap.add_argument("--dev", default=os.path.join(os.environ.get("LMOS_DATA_DIR", "data"),
                                                "apps/banking77/dev.tsv"))
  ap.add_argument("--clients", default="1,8,32")
  ap.add_argument("--requests", type=int, default=600, help="requests per client count")
  ap.add_argument("--seconds", type=float, default=60, help="time cap per client count")
  ap.add_argument("--start-timeout", type=float, default=600)
  args = ap.parse_args()
  texts = questions(args.dev)
  counts = [int(c) for c in args.clients.split(",")]
  results = {}
  for mode, flags in MODES.items():
    proc, url = start(args.workdir, flags, args.start_timeout)
    try:
      asyncio.run(level(url, texts, 4, 32, 30))  # connections and code paths warmed
      results[mode] = [asyncio.run(level(url, texts, n, args.requests, args.seconds))
                       for n in counts]
    finally:
      proc.send_signal(signal.SIGTERM)
      code = proc.wait(timeout=120)
    print(f"batching {mode}: server exited {code} after SIGTERM", flush=True)
  print("\n| clients | batching | requests | failed | requests/s | p50 ms | p95 ms | p99 ms |"
        " on/off requests/s |")
  print("|---|---|---|---|---|---|---|---|---|")
  for i, n in enumerate(counts):
    on, off = results["on"][i], results["off"][i]
    for mode, r in (("on", on), ("off", off)):
      ratio = f"{on['rps'] / off['rps']:.2f}x" if mode == "on" else ""
      print(f"| {n} | {mode} | {r['done']} | {r['failed']} | {r['rps']:.1f} | {r['p50']:.1f} "
            f"| {r['p95']:.1f} | {r['p99']:.1f} | {ratio} |")


if __name__ == "__main__":
  main()
