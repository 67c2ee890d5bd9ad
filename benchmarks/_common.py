"""What the benchmarks share: the machine header and the interleaved timer.

Imported by the scripts in this folder as `import _common` (a script's own
folder is first on `sys.path`).
"""

from collections.abc import Callable, Sequence
import datetime
import os
import platform
import statistics
import subprocess
import time

import jax

# The `lscpu` fields a header names by default.
LSCPU_FIELDS = ("Model name", "CPU(s):", "Thread(s) per core")


def print_flush(*args) -> None:
  print(*args, flush=True)


def lscpu(fields: Sequence[str] = LSCPU_FIELDS) -> str:
  """The `lscpu` lines that start with one of `fields`, joined by "; ".

  A `"Flags"` field is reported as whether the CPU has AVX-512F. Without
  `lscpu`, the processor name from `platform` (or "unknown").
  """
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True,
                         check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return platform.processor() or "unknown"
  lines = []
  for line in out.splitlines():
    if line.strip().startswith(tuple(fields)):
      line = " ".join(line.split())
      if line.startswith("Flags"):
        line = "avx512f: " + str("avx512f" in line)
      lines.append(line)
  return "; ".join(lines)


def load() -> str:
  """The 1/5/15-minute load averages, e.g. "2.1/1.8/1.5"."""
  return "/".join(f"{x:.1f}" for x in os.getloadavg())


def header(name: str, started: datetime.datetime,
           fields: Sequence[str] = LSCPU_FIELDS) -> list[str]:
  """The Markdown title and bullets (date, machine, platform) of a report."""
  return [
      f"## {name}",
      f"- date: {started:%Y-%m-%d %H:%M} UTC",
      f"- machine: {lscpu(fields)}",
      f"- platform: {platform.platform()}, jax {jax.__version__}, "
      f"devices {jax.devices()}",
  ]


def interleaved(fns: dict[str, Callable[[], object]],
                rounds: int) -> dict[str, list[float]]:
  """Wall times of each callable, interleaved, after one warm-up call each.

  Each round calls every function once; the order alternates (forwards,
  backwards, ...) so that no function always runs after the same one.
  """
  for fn in fns.values():
    fn()
  times = {k: [] for k in fns}
  order = list(fns)
  for r in range(rounds):
    for k in order if r % 2 == 0 else order[::-1]:
      t0 = time.perf_counter()
      fns[k]()
      times[k].append(time.perf_counter() - t0)
  return times


def fmt(ts: Sequence[float]) -> str:
  """`median (min–max)` of times in seconds, three decimals."""
  return f"{statistics.median(ts):.3f} ({min(ts):.3f}–{max(ts):.3f})"
