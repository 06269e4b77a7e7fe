"""What the host's CPU is, from Linux's /proc/cpuinfo: its model (the key of a measured
peak), its first block (what -march=native compiles for) and whether it multiplies bf16 in
hardware (what `train.precision=auto` decides on). Elsewhere every answer is empty and
callers fall back to `platform`."""

from __future__ import annotations

from pathlib import Path


def cpuinfo() -> str:
  """This host's /proc/cpuinfo ('' where there is none: macOS, Windows)."""
  try:
    return Path("/proc/cpuinfo").read_text()
  except OSError:
    return ""


def _first_cpu(text: str) -> dict[str, str]:
  """The first processor's `key: value` lines."""
  fields: dict[str, str] = {}
  for line in text.split("\n\n")[0].splitlines():
    key, sep, value = line.partition(":")
    if sep:
      fields.setdefault(key.strip(), value.strip())
  return fields


def cpu_model(text: str | None = None) -> str:
  """The CPU's model name ('' when not known)."""
  return _first_cpu(cpuinfo() if text is None else text).get("model name", "")


def cpu_identity(text: str | None = None) -> str:
  """The model name and the feature flags: what code built for this CPU depends on."""
  fields = _first_cpu(cpuinfo() if text is None else text)
  return "\n".join(f"{k}: {fields[k]}" for k in ("model name", "flags") if k in fields)


def bf16_dot_flags(text: str | None = None) -> list[str]:
  """The bf16 dot-product instruction sets among the CPU's flags (x86: AVX512-BF16, AMX-BF16),
  in the order checked."""
  have = set(_first_cpu(cpuinfo() if text is None else text).get("flags", "").split())
  return [f for f in ("avx512_bf16", "amx_bf16") if f in have]
