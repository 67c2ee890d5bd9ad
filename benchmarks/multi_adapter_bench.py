r"""Mixed-adapter batch vs one call per adapter, on MiniLM.

  python benchmarks/multi_adapter_bench.py
  python benchmarks/multi_adapter_bench.py --adapters=8 --rounds=7

all-MiniLM-L6-v2 (`assets.minilm_path()`) gets `--adapters` named LoRA
adapters (`lowrank.adapters.multi`, rank `--rank`, alpha 2·rank) on every
linear layer of the encoder (query/key/value/dense), with random non-zero
factors. A batch of `--batch` sequences × `--length` tokens has a random
adapter id per row. Configurations, each a `jax.jit` of a pure function of
the model state, timed interleaved (round-robin, order rotated each round)
in this one process:

* `mixed (gathered)`: one call for the whole batch inside
  `multi.adapter_ids(model, ids)`: every layer gathers `A[ids]`, `B[ids]`
  and does two batched matmuls.
* `mixed (gathered), C chunks`: the same, with the batch cut into
  `--chunks` row chunks run one after another by `jax.lax.map` inside the
  one call (smaller activations; separates batch-size effects on the CPU
  caches from the cost of the method).
* `per adapter, active`: one call per adapter on its rows (sub-batches
  split before timing; the adapter is selected with `set_active`, so all
  sizes share one trace per size and no retrace happens when switching).
* `per adapter, merged`: one call per adapter on its rows, with that
  adapter pre-merged into its own copy of the weights (N weight copies).
* `one adapter, whole batch`: the whole batch with one adapter active (what
  the LoRA update costs without the per-row gather).
* `base only`: the whole batch through the model without adapters (floor).

Reported: median wall time per configuration (and per-round CPU time), the
ratio to the mixed call, and `memory_analysis()` of the compiled calls
(for the per-adapter ones, the largest sub-batch's call; they run one after
another). The timed per-adapter loops do not reassemble the output, which
favours them slightly. Timings on a shared, loaded CPU are noisy: read the
ratios of interleaved runs.
"""

import datetime
import statistics
import time

from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

import _common  # pylint: disable=g-bad-import-order

from lowrank import adapters
from lowrank import assets
from lowrank import sharding
from lowrank.adapters import multi
from lowrank.models import bert

_ADAPTERS = flags.DEFINE_integer("adapters", 8, "Number of named adapters.")
_RANK = flags.DEFINE_integer("rank", 8, "LoRA rank of every adapter.")
_BATCH = flags.DEFINE_integer("batch", 64, "Sequences per batch.")
_LENGTH = flags.DEFINE_integer("length", 64, "Tokens per sequence.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed rounds (after warm-up).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for ids, tokens and factors.")
_CHUNKS = flags.DEFINE_integer(
    "chunks", 8, "Row chunks of the chunked mixed call (divides --batch)."
)

TARGETS = r"encoder\..*\.(query|key|value|dense)"
_MIB = 2**20


_load = _common.load


def _memory(compiled) -> dict[str, float]:
  m = compiled.memory_analysis()
  return {
      "argument": m.argument_size_in_bytes / _MIB,
      "output": m.output_size_in_bytes / _MIB,
      "temp": m.temp_size_in_bytes / _MIB,
      "total": (m.argument_size_in_bytes + m.output_size_in_bytes
                + m.temp_size_in_bytes - m.alias_size_in_bytes) / _MIB,
  }


def _randomize(model, seed: int) -> None:
  """Non-zero B factors for every adapter (A is already random)."""
  for i, m in enumerate(multi.multi_modules(model).values()):
    b = m.lora_b.get_value()
    key = jax.random.fold_in(jax.random.key(seed), i)
    m.lora_b.set_value(jax.random.normal(key, b.shape, b.dtype) * 0.02)


def main(argv):
  del argv
  n, batch, length = _ADAPTERS.value, _BATCH.value, _LENGTH.value
  started = datetime.datetime.now(datetime.timezone.utc)
  load_start = _load()
  rng = np.random.default_rng(_SEED.value)
  with sharding.use_mesh():
    model = bert.load_pretrained(assets.minilm_path())
    base_model = bert.load_pretrained(assets.minilm_path())
    names = [f"task{i}" for i in range(n)]
    for i, name in enumerate(names):
      multi.add_adapter(model, name, targets=TARGETS, rank=_RANK.value,
                        alpha=2 * _RANK.value, rngs=_SEED.value + i)
    _randomize(model, _SEED.value)
    model.eval()
  vocab = model.config.vocab_size
  tokens = jnp.asarray(rng.integers(1000, vocab, (batch, length)), jnp.int32)
  mask = jnp.ones((batch, length), jnp.int32)
  ids = rng.integers(0, n, batch)
  rows = [np.flatnonzero(ids == a) for a in range(n)]
  sub = [(tokens[r], mask[r]) for r in rows]
  ids_j = jnp.asarray(ids, jnp.int32)

  graphdef, state = nnx.split(model)
  state = nnx.as_pure(state)

  @jax.jit
  def mixed(state, tokens, mask, ids):
    m = nnx.merge(graphdef, state)
    with multi.adapter_ids(m, ids):
      return m(tokens, mask)

  chunks = _CHUNKS.value

  @jax.jit
  def mixed_chunked(state, tokens, mask, ids):
    def body(xs):
      tok, msk, row_ids = xs
      m = nnx.merge(graphdef, state)
      with multi.adapter_ids(m, row_ids):
        return m(tok, msk)

    split = lambda t: t.reshape((chunks, -1) + t.shape[1:])
    out = jax.lax.map(body, (split(tokens), split(mask), split(ids)))
    return out.reshape((tokens.shape[0],) + out.shape[2:])

  @jax.jit
  def single(state, tokens, mask):
    return nnx.merge(graphdef, state)(tokens, mask)

  # One state per adapter that differs only in the adapter index values.
  active_states = []
  for name in names:
    multi.set_active(model, name)
    active_states.append(nnx.as_pure(nnx.state(model)))
  # One merged weight copy per adapter (wrappers marked merged: base only).
  original = jax.tree.map(jnp.copy, nnx.state(model))
  merged_states = []
  for name in names:
    multi.set_active(model, name)
    adapters.merge(model)
    gd_merged, st = nnx.split(model)
    merged_states.append(jax.tree.map(jnp.copy, nnx.as_pure(st)))
    adapters.unmerge(model)
    nnx.update(model, original)
  multi.set_active(model, names[0])

  @jax.jit
  def merged_call(state, tokens, mask):
    return nnx.merge(gd_merged, state)(tokens, mask)

  bgd, bstate = nnx.split(base_model)
  bstate = nnx.as_pure(bstate)

  @jax.jit
  def base_call(state, tokens, mask):
    return nnx.merge(bgd, state)(tokens, mask)

  # Correctness: the mixed call equals each row with its adapter alone.
  out_mixed = mixed(state, tokens, mask, ids_j)
  err = float(jnp.max(jnp.abs(
      mixed_chunked(state, tokens, mask, ids_j) - out_mixed)))
  for a in range(n):
    if len(rows[a]):
      got = single(active_states[a], *sub[a])
      err = max(err, float(jnp.max(jnp.abs(got - out_mixed[rows[a]]))))
      got_m = merged_call(merged_states[a], *sub[a])
      err = max(err, float(jnp.max(jnp.abs(got_m - out_mixed[rows[a]]))))

  def run_mixed():
    return [mixed(state, tokens, mask, ids_j)]

  def run_chunked():
    return [mixed_chunked(state, tokens, mask, ids_j)]

  def run_active():
    return [single(active_states[a], *sub[a]) for a in range(n)
            if len(rows[a])]

  def run_merged():
    return [merged_call(merged_states[a], *sub[a]) for a in range(n)
            if len(rows[a])]

  def run_one():
    return [single(active_states[0], tokens, mask)]

  def run_base():
    return [base_call(bstate, tokens, mask)]

  configs = {
      "mixed (gathered)": run_mixed,
      f"mixed (gathered), {chunks} chunks": run_chunked,
      "per adapter, active": run_active,
      "per adapter, merged": run_merged,
      "one adapter, whole batch": run_one,
      "base only (no adapters)": run_base,
  }
  for fn in configs.values():  # Warm-up: compiles every shape.
    jax.block_until_ready(fn())
  times = {k: [] for k in configs}
  cpu = {k: [] for k in configs}
  order = list(configs)
  for r in range(_ROUNDS.value):
    for k in order[r % len(order):] + order[: r % len(order)]:
      t0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(configs[k]())
      times[k].append(time.perf_counter() - t0)
      cpu[k].append(time.process_time() - c0)

  big = int(np.argmax([len(r) for r in rows]))
  mem = {
      "mixed (gathered)": _memory(
          mixed.lower(state, tokens, mask, ids_j).compile()),
      f"mixed (gathered), {chunks} chunks": _memory(
          mixed_chunked.lower(state, tokens, mask, ids_j).compile()),
      "per adapter, active": _memory(
          single.lower(active_states[big], *sub[big]).compile()),
      "per adapter, merged": _memory(
          merged_call.lower(merged_states[big], *sub[big]).compile()),
      "one adapter, whole batch": _memory(
          single.lower(active_states[0], tokens, mask).compile()),
      "base only (no adapters)": _memory(
          base_call.lower(bstate, tokens, mask).compile()),
  }
  resident = {
      "per adapter, merged": sum(
          x.nbytes for s in merged_states for x in jax.tree.leaves(s)) / _MIB,
  }
  ref = statistics.median(times["mixed (gathered)"])
  ref_cpu = statistics.median(cpu["mixed (gathered)"])
  print("\n".join(_common.header(
      "multi_adapter_bench", started,
      _common.LSCPU_FIELDS + ("L3 cache",))))
  print(f"- load average (1/5/15 min) at start: {load_start}, at end: "
        f"{_load()}")
  print(f"- {n} adapters, rank {_RANK.value}, targets {TARGETS!r}; batch "
        f"{batch} x {length} tokens; rows per adapter "
        f"{[len(r) for r in rows]} (largest: {len(rows[big])})")
  print(f"- max |mixed - per-adapter| over all rows: {err:.2e}")
  print()
  print("| config | calls | median ms (min–max) | time ratio vs mixed | "
        "CPU-time ratio | arg MiB | temp MiB | total MiB |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|")
  for k in configs:
    calls = sum(1 for r in rows if len(r)) if k.startswith("per") else 1
    t = times[k]
    m = mem[k]
    print(
        f"| {k} | {calls} | {1e3 * statistics.median(t):.0f} "
        f"({1e3 * min(t):.0f}–{1e3 * max(t):.0f}) | "
        f"{statistics.median(t) / ref:.2f} | "
        f"{statistics.median(cpu[k]) / ref_cpu:.2f} | {m['argument']:.0f} | "
        f"{m['temp']:.0f} | {m['total']:.0f} |"
    )
  print()
  print(f"- merged weight copies held by 'per adapter, merged': "
        f"{resident['per adapter, merged']:.0f} MiB")


if __name__ == "__main__":
  app.run(main)
