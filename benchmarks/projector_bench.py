r"""Cost and accuracy of GaLore projector computations on the current backend.

  python benchmarks/projector_bench.py            # 60M config shapes
  python benchmarks/projector_bench.py --smoke    # tiny, seconds

For a `[L, m, n]` stacked gradient with a decaying spectrum (the shape of
the GaLore 60M config's MLP leaves), times in one process:

* `svd`: `lowrank.optim.projection.svd_projector` (exact SVD);
* `rsvd-householder`: `rsvd_projector(method="householder")` (Householder
  QR of every sketch, SVD of the small `QᵀG`);
* `rsvd-cholesky`: `rsvd_projector(method="cholesky")`, the default
  (shifted CholeskyQR3 with a Householder fallback, `eigh` of the small
  Gram matrix: matmuls and `[w, w]` factorisations).

For each: median time over repeats (jit, warm, `block_until_ready`), and
the captured energy `‖PᵀG‖² / ‖P_svdᵀG‖²` (1.0 = as good as exact SVD).
"""

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from lowrank.optim import projection


def make_grad(key, layers, m, n):
  """A gradient-like matrix: power-law spectrum, random singular vectors."""
  k1, k2 = jax.random.split(key)
  r = min(m, n)
  u = jnp.linalg.qr(jax.random.normal(k1, (layers, m, r)))[0]
  v = jnp.linalg.qr(jax.random.normal(k2, (layers, n, r)))[0]
  s = 1.0 / (1.0 + jnp.arange(r, dtype=jnp.float32)) ** 0.8
  return jnp.einsum("lmr,r,lnr->lmn", u, s, v)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--smoke", action="store_true")
  ap.add_argument("--repeats", type=int, default=15)
  args = ap.parse_args()
  rank = 16 if args.smoke else 128
  shapes = ([(2, 96, 48), (1, 96, 48)] if args.smoke else
            [(8, 1376, 512), (1, 1376, 512), (8, 512, 512), (1, 512, 512)])
  key = jax.random.key(0)
  variants = {
      "svd": lambda g, k: projection.svd_projector(g, rank, "left"),
      "rsvd-householder": lambda g, k: projection.rsvd_projector(
          g, rank, "left", k, method="householder"),
      "rsvd-cholesky": lambda g, k: projection.rsvd_projector(
          g, rank, "left", k, method="cholesky"),
  }
  print(f"# projector_bench {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        f"; {platform.platform()} {os.cpu_count()} cpus; jax {jax.__version__}"
        f"; devices {jax.devices()}; rank {rank}")
  print("\n| shape | projector | median ms (min–max) | vs svd | vs householder "
        "| captured energy vs svd | max |PᵀP − I| |")
  print("|---|---|---:|---:|---:|---:|---:|")
  for shape in shapes:
    g = make_grad(jax.random.key(1), *shape)
    exact = None
    times = {}
    for name, fn in variants.items():
      f = jax.jit(fn)
      p = jax.block_until_ready(f(g, key))
      ts = []
      for _ in range(args.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(g, key))
        ts.append(time.perf_counter() - t0)
      times[name] = statistics.median(ts)
      energy = jnp.sum(jnp.einsum("lmr,lmn->lrn", p, g) ** 2)
      if exact is None:
        exact = energy
      ortho_err = jnp.max(jnp.abs(jnp.einsum("lmr,lms->lrs", p, p)
                                  - jnp.eye(p.shape[-1])))
      print(f"| {shape} | {name} | {1e3 * times[name]:.2f} "
            f"({1e3 * min(ts):.2f}–{1e3 * max(ts):.2f}) | "
            f"{times[name] / times['svd']:.3f} | "
            f"{times[name] / times.get('rsvd-householder', times[name]):.3f} | "
            f"{float(energy / exact):.5f} | {float(ortho_err):.1e} |",
            flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
