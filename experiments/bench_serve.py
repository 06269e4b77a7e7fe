"""`lmos serve` under concurrent load: throughput and latency with dynamic batching on and off.

Two servers start as subprocesses, each on a free 127.0.0.1 port:
  batching on   --max-batch 32 --max-wait-ms 5 (the defaults)
  batching off  --max-batch 1  (every request is its own batch of one row)
then, for each client count N, in turn against each server, N concurrent HTTP clients (aiohttp, one asyncio loop in this
process, one keep-alive connection each) each send /v1/classify requests of one question (dev
questions in turn) back to back until the level has sent --requests requests or run
--seconds, whichever comes first. Printed per N: completed requests/s, p50/p95/p99 latency
(send to response), failed requests (any status but 200, or a transport error), and the
on/off throughput ratio measured in the same run; and the CPU seconds the server process and
this load generator used, since both share the machine's cores. The server is stopped with
SIGTERM and its exit status is checked (0).

The load generator is aiohttp (the `bench` extra: pip install -e '.[bench]') because it is
cheap: ~0.25 ms of CPU per request, against ~2.6 ms for httpx, which on 2 cores took a
quarter of the machine from the server under test.

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

import aiohttp
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
    if asyncio.run(healthy(url)):
      return proc, url
    time.sleep(0.5)
  proc.kill()
  raise SystemExit(f"lmos serve did not start in {timeout_s} s; see {log.name}")


async def healthy(url: str) -> bool:
  try:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/healthz",
                                                   timeout=aiohttp.ClientTimeout(2)) as r:
      return r.status == 200
  except (aiohttp.ClientError, asyncio.TimeoutError):
    return False


def cpu_seconds(pid: int) -> float:
  """User + system CPU seconds of a process so far (Linux /proc; 0 elsewhere)."""
  try:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
  except OSError:
    return 0.0
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def level(url: str, texts: list[str], clients: int, requests: int, seconds: float,
                server_pid: int) -> dict:
  """`clients` loops sending one-question requests until `requests` sent or `seconds` up."""
  lat, failed = [], 0
  sent = 0
  stop_at = time.perf_counter() + seconds

  async def client(s: aiohttp.ClientSession) -> None:
    nonlocal sent, failed
    while sent < requests and time.perf_counter() < stop_at:
      i = sent
      sent += 1
      t0 = time.perf_counter()
      try:
        async with s.post(f"{url}/v1/classify",
                          json={"texts": [texts[i % len(texts)]]}) as r:
          await r.read()
          ok = r.status == 200
      except (aiohttp.ClientError, asyncio.TimeoutError):
        ok = False
      if ok:
        lat.append(time.perf_counter() - t0)
      else:
        failed += 1
  connector = aiohttp.TCPConnector(limit=clients)
  async with aiohttp.ClientSession(connector=connector,
                                   timeout=aiohttp.ClientTimeout(30)) as s:
    cpu0, me0, t0 = cpu_seconds(server_pid), time.process_time(), time.perf_counter()
    await asyncio.gather(*[client(s) for _ in range(clients)])
    wall = time.perf_counter() - t0
    server_cpu, client_cpu = cpu_seconds(server_pid) - cpu0, time.process_time() - me0
  ms = 1e3 * np.asarray(lat) if lat else np.zeros(1)
  return {"clients": clients, "done": len(lat), "failed": failed, "rps": len(lat) / wall,
          "p50": np.percentile(ms, 50), "p95": np.percentile(ms, 95),
          "p99": np.percentile(ms, 99), "server_cpu": server_cpu, "client_cpu": client_cpu,
          "wall": wall}


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
  servers: dict[str, tuple[subprocess.Popen, str]] = {}
  results: dict[str, list[dict]] = {mode: [] for mode in MODES}
  try:
    for mode, flags in MODES.items():  # both up at once; an idle one takes no CPU
      servers[mode] = start(args.workdir, flags, args.start_timeout)
      proc, url = servers[mode]
      asyncio.run(level(url, texts, 4, 32, 30, proc.pid))  # code paths warmed
    for n in counts:  # the two modes back to back at each count: the same machine state
      for mode, (proc, url) in servers.items():
        results[mode].append(asyncio.run(level(url, texts, n, args.requests, args.seconds,
                                               proc.pid)))
  finally:
    for mode, (proc, _) in servers.items():
      proc.send_signal(signal.SIGTERM)
      print(f"batching {mode}: server exited {proc.wait(timeout=120)} after SIGTERM",
            flush=True)
  print("\n| clients | batching | requests | failed | requests/s | p50 ms | p95 ms | p99 ms |"
        " on/off requests/s | server CPU s | load generator CPU s | wall s |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for i, n in enumerate(counts):
    on, off = results["on"][i], results["off"][i]
    for mode, r in (("on", on), ("off", off)):
      ratio = f"{on['rps'] / off['rps']:.2f}x" if mode == "on" else ""
      print(f"| {n} | {mode} | {r['done']} | {r['failed']} | {r['rps']:.1f} | {r['p50']:.1f} "
            f"| {r['p95']:.1f} | {r['p99']:.1f} | {ratio} | {r['server_cpu']:.1f} "
            f"| {r['client_cpu']:.1f} | {r['wall']:.1f} |")


if __name__ == "__main__":
  main()
