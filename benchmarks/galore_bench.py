r"""GaLore-family optimizers vs AdamW on the GaLore paper's 60M LLaMA config.

  python benchmarks/galore_bench.py            # full 60M config
  python benchmarks/galore_bench.py --smoke    # tiny, seconds
  python benchmarks/galore_bench.py --only "svd|56 layers" --skip_fsdp
  python benchmarks/galore_bench.py --batch 16 # 16 sequences per step

A functional LLaMA-style decoder (RMSNorm, causal attention, SwiGLU; d_model
512, 8 layers, MLP 1376, vocab 32000, stacked `[L, m, n]` layer weights) is
trained on random tokens. Embeddings, norms and the head use plain Adam;
attention and MLP weights are projected (rank 128, gap 200), as in the paper.
Every optimizer runs in this one process, interleaved, and the script prints:

* optimizer-state bytes (all, and of the projected leaves only) vs AdamW;
* compiled train-step memory (`memory_analysis()`, exact) vs AdamW;
* median normal-step and refresh-step time and the amortised step time
  `((gap − k) · normal + k · refresh) / gap` (k = refresh steps per gap:
  1, or the number of stagger groups), vs AdamW and vs
  `optax.contrib.galore`; the normal step also as the median of per-round
  ratios to AdamW's (paired: both ran in the same round); every time
  ratio for wall time and for process CPU time;
* under FSDP on 8 (fake CPU) devices, per-device state bytes of the
  projected leaves vs sharded AdamW.
"""

import argparse
import datetime
import functools
import os
import platform
import re
import statistics
import sys
import time

if "--fsdp-child" in sys.argv:
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import optax  # pylint: disable=g-import-not-at-top

import _common  # pylint: disable=g-import-not-at-top,g-bad-import-order

from lowrank import optim  # pylint: disable=g-import-not-at-top
from lowrank import sharding  # pylint: disable=g-import-not-at-top

P = jax.sharding.PartitionSpec
CONFIGS = {
    "60m": dict(d=512, layers=8, mlp=1376, heads=8, vocab=32000, rank=128,
                batch=4, seq=128),
    "smoke": dict(d=64, layers=2, mlp=160, heads=4, vocab=512, rank=16,
                  batch=2, seq=16),
}
PROJECTED = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def init_params(cfg, key):
  d, n_layers, f, v = cfg["d"], cfg["layers"], cfg["mlp"], cfg["vocab"]
  ks = iter(jax.random.split(key, 16))
  normal = lambda shape, fan_in: (  # pylint: disable=g-long-lambda
      jax.random.normal(next(ks), shape) / fan_in**0.5)
  return {
      "embed": normal((v, d), 1.0) * 0.02,
      "layers": {
          "wq": normal((n_layers, d, d), d), "wk": normal((n_layers, d, d), d),
          "wv": normal((n_layers, d, d), d), "wo": normal((n_layers, d, d), d),
          "w_gate": normal((n_layers, d, f), d),
          "w_up": normal((n_layers, d, f), d),
          "w_down": normal((n_layers, f, d), f),
          "norm1": jnp.ones((n_layers, d)), "norm2": jnp.ones((n_layers, d)),
      },
      "norm": jnp.ones((d,)),
      "head": normal((d, v), d),
  }


def _rms(x, w):
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * w


def loss_fn(params, tokens, cfg):
  h = params["embed"][tokens[:, :-1]]
  b, t, d = h.shape
  nh = cfg["heads"]
  mask = jnp.tril(jnp.ones((t, t), bool))

  def block(h, lp):
    x = _rms(h, lp["norm1"])
    q, k, v = (jnp.reshape(x @ lp[w], (b, t, nh, d // nh))
               for w in ("wq", "wk", "wv"))
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / (d // nh) ** 0.5
    a = jax.nn.softmax(jnp.where(mask, s, -1e9), axis=-1)
    h = h + jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, t, d) @ lp["wo"]
    x = _rms(h, lp["norm2"])
    h = h + (jax.nn.silu(x @ lp["w_gate"]) * (x @ lp["w_up"])) @ lp["w_down"]
    return h, None

  h, _ = jax.lax.scan(block, h, params["layers"])
  logits = _rms(h, params["norm"]) @ params["head"]
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, tokens[:, 1:]).mean()


def projected_mask(params):
  return jax.tree_util.tree_map_with_path(
      lambda p, _: any(n in jax.tree_util.keystr(p) for n in PROJECTED),
      params)


def optimizers(cfg, gap):
  """Candidates: name -> (make(params) -> tx, refresh steps per gap)."""
  r = cfg["rank"]
  # `init_params` stacks the layers: one projector per layer.
  stacked = r"\['layers'\]"
  kw = dict(rank=r, refresh_every=gap, scale=0.25, stacked_axes=stacked)
  num_leaves = len(PROJECTED)
  num_matrices = num_leaves * cfg["layers"]

  def split(galore_tx):
    # Projected weights get `galore_tx`; the rest plain AdamW (the paper).
    return lambda params: optax.multi_transform(
        {"proj": galore_tx, "plain": optax.adamw(1e-3)},
        jax.tree.map(lambda m: "proj" if m else "plain",
                     projected_mask(params)))

  # Staggered refreshes: one refresh step per non-empty group and gap.
  leaf_groups = min(8, num_leaves)
  return {
      "adamw": (lambda params: optax.adamw(1e-3), 1),
      "optax.contrib.galore": (split(optax.contrib.galore(
          1e-3, rank=r, update_proj_gap=gap, scale=0.25)), 1),
      "galore (svd)": (split(optim.galore_adamw(1e-3, **kw)), 1),
      "galore (rsvd, stagger 8 leaves)": (split(optim.galore_adamw(
          1e-3, projector="rsvd", stagger=8, **kw)), leaf_groups),
      f"galore (rsvd, stagger {num_matrices} layers)": (
          split(optim.galore_adamw(
              1e-3, projector="rsvd", stagger=num_matrices,
              stagger_layers=True, **kw)), num_matrices),
      "fira": (split(optim.fira_adamw(1e-3, **kw)), 1),
      "frugal": (split(optim.frugal_adamw(1e-3, rank=r, refresh_every=gap,
                                          stacked_axes=stacked)), 1),
      "q-galore (4-bit proj)": (split(optim.q_galore_adamw(1e-3, **kw)), 1),
      "q-galore + 8-bit adam": (split(optax.chain(
          optim.scale_by_galore(optim.scale_by_adam8bit(), rank=r,
                                refresh_every=gap, scale=0.25, projector_bits=4,
                                adaptive_gap=True, stacked_axes=stacked),
          optax.scale_by_learning_rate(1e-3))), 1),
  }


def _projected_state_leaves(state, params):
  """The state leaves that belong to projected parameters."""
  mask = projected_mask(params)
  names = [jax.tree_util.keystr(p) for p, m in
           jax.tree_util.tree_leaves_with_path(mask) if m]
  return [x for path, x in jax.tree_util.tree_leaves_with_path(state)
          if any(n in jax.tree_util.keystr(path) for n in names)]


def _projected_state_bytes(state, params):
  """Bytes of state leaves that belong to projected parameters."""
  return sum(optim.tree_bytes(x) for x in _projected_state_leaves(state, params)
             if hasattr(x, "dtype"))


def _set_count(state, value, refresh=False):
  """Sets every step counter to `value`.

  With `refresh`, Q-GaLore's per-layer `next_refresh` is set to `value` as
  well, so that the next step recomputes every basis (otherwise only the
  first forced refresh would be real: it moves `next_refresh` a gap on).
  """
  def fix(path, x):
    name = jax.tree_util.keystr(path)
    if name.endswith(".count") and x.ndim == 0 and x.dtype == jnp.int32:
      return jnp.full_like(x, value)
    if refresh and name.endswith(".next_refresh"):
      return jnp.full_like(x, value)
    return x
  return jax.tree_util.tree_map_with_path(fix, state)


def bench_single(cfg, gap, steps, only=None):
  params = init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (cfg["batch"],
                                                  cfg["seq"] + 1), 0,
                              cfg["vocab"])
  results = {}
  runners = {}
  for name, (make, k) in optimizers(cfg, gap).items():
    if only and name != "adamw" and not re.search(only, name):
      continue
    tx = make(params)
    state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, tokens, tx=tx):
      loss, g = jax.value_and_grad(loss_fn)(params, tokens, cfg)
      u, state = tx.update(g, state, params)
      return optax.apply_updates(params, u), state, loss

    compiled = step.lower(params, state, tokens).compile()
    mem = compiled.memory_analysis()
    results[name] = {
        "state": optim.state_bytes(state),
        "proj_state": _projected_state_bytes(state, params),
        "step_mem": (mem.argument_size_in_bytes + mem.output_size_in_bytes
                     + mem.temp_size_in_bytes - mem.alias_size_in_bytes),
        "normal": [], "refresh": [], "normal_cpu": [], "refresh_cpu": [],
        "k": k,
    }
    p = jax.tree.map(jnp.copy, params)
    p, state, _ = compiled(p, state, tokens)  # step 0: initial refresh
    runners[name] = [compiled, p, state]
    print(f"compiled {name}", file=sys.stderr, flush=True)
  # Interleave: every optimizer takes one normal and one refresh step per
  # round, so machine noise hits all of them alike. Wall and process CPU
  # time are both kept: on a shared machine CPU time moves less with load.
  for round_ in range(steps + 1):  # Round 0 warms up (not recorded).
    for name, run in runners.items():
      compiled, p, state = run
      for kind in ("normal", "refresh"):
        if kind == "refresh":  # Force the next step to recompute bases.
          state = _set_count(state, gap, refresh=True)
        t0, c0 = time.perf_counter(), time.process_time()
        p, state, loss = compiled(p, state, tokens)
        jax.block_until_ready((p, state, loss))
        if round_:
          results[name][kind].append(time.perf_counter() - t0)
          results[name][kind + "_cpu"].append(time.process_time() - c0)
      state = _set_count(state, gap + 1)
      run[1], run[2] = p, state
    print(f"round {round_} done", file=sys.stderr, flush=True)
  return results


def bench_fsdp(cfg, gap):
  """Per-device state bytes of projected leaves under fsdp=8."""
  mesh = sharding.make_mesh([("data", 1), ("fsdp", 8), ("tensor", 1)])
  params = init_params(cfg, jax.random.key(0))

  def spec(path, x):
    name = jax.tree_util.keystr(path)
    if x.ndim == 3:  # [L, m, n]: shard the larger matrix axis.
      return P(None, "fsdp", None) if x.shape[1] >= x.shape[2] else P(
          None, None, "fsdp")
    if x.ndim == 2 and "embed" in name:
      return P("fsdp", None)
    if x.ndim == 2 and "head" in name:
      return P(None, "fsdp")
    return P()

  specs = jax.tree_util.tree_map_with_path(spec, params)
  params = jax.tree.map(
      lambda x, s: jax.device_put(x, jax.sharding.NamedSharding(mesh, s)),
      params, specs)
  out = {}
  for name, (make, _) in optimizers(cfg, gap).items():
    tx = make(params)
    sh = sharding.shardings_like_params(jax.eval_shape(tx.init, params),
                                        params)
    with jax.set_mesh(mesh):
      state = jax.jit(tx.init, out_shardings=sh)(params)
    out[name] = sum(x.addressable_shards[0].data.nbytes
                    for x in _projected_state_leaves(state, params)
                    if hasattr(x, "addressable_shards"))
  return out


_load = _common.load


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--gap", type=int, default=200)
  parser.add_argument("--batch", type=int, default=None,
                      help="sequences per batch (default: the config's)")
  parser.add_argument("--only", default=None,
                      help="regex: run only matching optimizers (+ adamw)")
  parser.add_argument("--skip_fsdp", action="store_true")
  parser.add_argument("--fsdp-child", action="store_true")
  args = parser.parse_args()
  cfg = dict(CONFIGS["smoke" if args.smoke else "60m"])
  if args.batch:
    cfg["batch"] = args.batch
  if args.fsdp_child:
    for name, b in bench_fsdp(cfg, args.gap).items():
      print(f"FSDP\t{name}\t{b}")
    return
  start = datetime.datetime.now(datetime.timezone.utc)
  print(f"# galore_bench {start:%Y-%m-%d %H:%M} UTC, load {_load()}; "
        f"{platform.platform()} {os.cpu_count()} cpus, jax {jax.__version__},"
        f" optax {optax.__version__}; config {cfg}, gap {args.gap}, "
        f"steps {args.steps}")
  res = bench_single(cfg, args.gap, args.steps, args.only)
  end = datetime.datetime.now(datetime.timezone.utc)
  print(f"# timed section ended {end:%H:%M} UTC "
        f"({(end - start).total_seconds():.0f} s), load {_load()}")
  base = res["adamw"]
  peer = res.get("optax.contrib.galore")
  med = statistics.median

  def amort(r, cpu=False):
    normal = med(r["normal_cpu" if cpu else "normal"])
    refresh = med(r["refresh_cpu" if cpu else "refresh"])
    return ((args.gap - r["k"]) * normal + r["k"] * refresh) / args.gap

  def ratios(r, other):
    if other is None:
      return "n/a"
    return (f"{amort(r) / amort(other):.3f} / "
            f"{amort(r, True) / amort(other, True):.3f}")

  print("\nRatios are wall / CPU time unless marked; paired = median over "
        "rounds of the per-round ratio.")
  print("\n| optimizer | state MiB | projected-leaf state vs AdamW | "
        "step memory vs AdamW | normal step ms (range) | normal vs AdamW: "
        "wall / paired / CPU | refresh/normal | refresh steps per gap | "
        "amortised vs AdamW | amortised vs optax galore |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for name, r in res.items():
    normal, cpu = med(r["normal"]), med(r["normal_cpu"])
    paired = med([a / b for a, b in zip(r["normal"], base["normal"])])
    print(f"| {name} | {r['state'] / 2**20:.1f} | "
          f"{r['proj_state'] / base['proj_state']:.3f} | "
          f"{r['step_mem'] / base['step_mem']:.3f} | "
          f"{1e3 * normal:.0f} ({1e3 * min(r['normal']):.0f}–"
          f"{1e3 * max(r['normal']):.0f}) | "
          f"{normal / med(base['normal']):.3f} / {paired:.3f} / "
          f"{cpu / med(base['normal_cpu']):.3f} | "
          f"{med(r['refresh']) / normal:.2f} / "
          f"{med(r['refresh_cpu']) / cpu:.2f} | {r['k']} | "
          f"{ratios(r, base)} | {ratios(r, peer)} |")
  if args.skip_fsdp:
    return
  import subprocess  # pylint: disable=g-import-not-at-top
  child = subprocess.run(
      [sys.executable, __file__, "--fsdp-child", f"--gap={args.gap}"]
      + (["--smoke"] if args.smoke else []),
      capture_output=True, text=True, check=True)
  fsdp = {line.split("\t")[1]: int(line.split("\t")[2])
          for line in child.stdout.splitlines() if line.startswith("FSDP")}
  print("\n| optimizer (fsdp=8) | projected-leaf state per device MiB | "
        "vs sharded AdamW |")
  print("|---|---:|---:|")
  for name, b in fsdp.items():
    print(f"| {name} | {b / 2**20:.2f} | {b / fsdp['adamw']:.3f} |")


if __name__ == "__main__":
  main()
