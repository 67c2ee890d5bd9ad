"""Hugging Face PEFT file format for LoRA adapters (read and write).

A PEFT LoRA adapter directory holds `adapter_config.json` and
`adapter_model.safetensors`. Keys are
`base_model.model.<module path>.lora_A.weight` (`[r, d_in]`) and
`....lora_B.weight` (`[d_out, r]`), i.e. the transposes of our
`A: [d_in, r]`, `B: [r, d_out]`; embedding adapters use
`....lora_embedding_A` (`[r, num_embeddings]`) and `....lora_embedding_B`
(`[features, r]`). Module paths are our NNX paths, which equal PyTorch's for
models that mirror Hugging Face attribute names (`lowrank.models.bert`).

Loading reads JSON and safetensors only: it never executes code.
"""

import collections
from collections.abc import Iterator, Mapping
import contextlib
import json
import os
import re
import tempfile
from typing import Any

from flax import nnx
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from lowrank import surgery
from lowrank.adapters import injection as inject_lib
from lowrank.adapters import layers

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
PEFT_TYPES = ("LORA", "ADALORA", "VERA")


def _keys(path: str, module: layers.LoRAWrapper) -> tuple[str, str]:
  if isinstance(module, layers.LoRAEmbed):
    return (
        f"{PREFIX}{path}.lora_embedding_A",
        f"{PREFIX}{path}.lora_embedding_B",
    )
  return f"{PREFIX}{path}.lora_A.weight", f"{PREFIX}{path}.lora_B.weight"


def _most_common(values):
  return collections.Counter(values).most_common(1)[0][0]


def _target_modules(paths: list[str], all_paths: list[str]) -> list[str]:
  """Shortest PEFT `target_modules` list that selects exactly `paths`.

  Uses the last path component (`["query", "value"]`) when that selects no
  extra module; otherwise the full paths.
  """
  names = sorted({p.rsplit(".", 1)[-1] for p in paths})
  if any(n.isdigit() for n in names):  # `["0"]` would read as a list index.
    return sorted(paths)
  selected = {
      p for p in all_paths if any(p == n or p.endswith("." + n) for n in names)
  }
  return names if selected == set(paths) else sorted(paths)


def read_json(path: str, what: str) -> dict[str, Any]:
  """Reads a JSON object from `path`; errors name the file and the fix.

  Raises:
    FileNotFoundError: If `path` does not exist.
    ValueError: If it is not UTF-8 JSON or not a JSON object.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"No {what} file {path}; expected an adapter directory written by "
        "lowrank.adapters.save_adapters (or by Hugging Face PEFT)."
    )
  try:
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(
        f"{path} is not valid JSON ({e}); the file is truncated or corrupt. "
        "Re-save the adapter."
    ) from e
  if not isinstance(config, dict):
    raise ValueError(
        f"{path}: expected a JSON object (the {what}); found a "
        f"{type(config).__name__}."
    )
  return config


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Reads a safetensors file; errors name the file and what is wrong.

  Raises:
    FileNotFoundError: If `path` does not exist.
    ValueError: If the file is truncated or not a safetensors file.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"No weights file {path}; the adapter directory is incomplete "
        "(both the config and the weights file are needed)."
    )
  try:
    return safetensors.numpy.load_file(path)
  except Exception as e:  # pylint: disable=broad-except
    # safetensors raises its own SafetensorError (e.g. "invalid header
    # length", "incomplete metadata, file not fully covered").
    raise ValueError(
        f"{path} is not a readable safetensors file "
        f"({type(e).__name__}: {e}); it is truncated or corrupt. Re-save "
        "the adapter."
    ) from e


def atomic_write(path: str, write_fn) -> None:
  """Writes `path` all at once: `write_fn(tmp)` then a rename onto `path`."""
  directory = os.path.dirname(path) or "."
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
  os.close(fd)
  try:
    write_fn(tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _lora_tensors(path, m, convert_initialized):
  """PEFT tensors, rank and alpha of one LoRA / DoRA module."""
  a, b = m.peft_factors()
  rank, alpha = m.rank, m.alpha
  if m.init == "lq_lora":
    raise ValueError(
        f"{path}: an LQ-LoRA adapter only works on its own quantised base "
        "Q(W − L₁L₂), which PEFT files cannot carry; save the whole model "
        "state instead."
    )
  if m.initialized_from_base:
    if not convert_initialized:
      raise ValueError(
          f"{path}: init {m.init!r} moved part of the base weight into the "
          "adapter, so its factors only make sense on the residual base. "
          "Pass convert_initialized=True to save an equivalent rank-2r "
          "adapter for the original base (as PEFT's "
          "path_initial_model_for_weight_conversion does), or save with "
          "save_adapters(directory, model, format='native')."
      )
    if m.method != "lora":
      raise ValueError(
          f"{path}: a {m.method!r} adapter with init {m.init!r} cannot be "
          "expressed on the original base weight; save with "
          "save_adapters(directory, model, format='native')."
      )
    a0 = m.initial_lora_a[...].reshape(-1, m.rank)
    b0 = m.initial_lora_b[...].reshape(m.rank, -1)
    a = jnp.concatenate([a, a0], axis=1)
    b = jnp.concatenate([b, -b0], axis=0)
    # Same scale at rank 2r: alpha/r -> 2 alpha / 2r, alpha/sqrt(r) ->
    # sqrt(2) alpha / sqrt(2r).
    rank, alpha = 2 * m.rank, m.alpha * (2**0.5 if m.rslora else 2.0)
  ka, kb = _keys(path, m)
  tensors = {
      ka: np.asarray(a, np.float32).T,
      kb: np.asarray(b, np.float32).T,
  }
  if m.method == "dora":
    tensors[f"{PREFIX}{path}.lora_magnitude_vector"] = np.asarray(
        m.magnitude[...], np.float32).reshape(-1)
  return tensors, rank, alpha


def _adalora_tensors(path, m):
  r = m.rank
  return {
      f"{PREFIX}{path}.lora_A": np.asarray(
          m.lora_a[...], np.float32).reshape(-1, r).T,
      f"{PREFIX}{path}.lora_E": np.asarray(
          m.lora_e[...] * m.rank_mask[...], np.float32).reshape(r, 1),
      f"{PREFIX}{path}.lora_B": np.asarray(
          m.lora_b[...], np.float32).reshape(r, -1).T,
  }


def _peft_type(mods) -> str:
  methods = {m.method for m in mods.values()}
  if methods <= {"lora", "dora"}:
    if len(methods) > 1:
      raise ValueError(
          "PEFT's LORA format has one use_dora flag for all modules; this "
          "model mixes 'lora' and 'dora' adapters. Save with "
          "save_adapters(directory, model, format='native')."
      )
    return "LORA"
  if methods == {"adalora"}:
    return "ADALORA"
  if methods == {"vera"}:
    return "VERA"
  raise ValueError(
      f"Hugging Face PEFT has no format for adapter method(s) "
      f"{sorted(methods - {'lora', 'dora', 'adalora', 'vera'}) or sorted(methods)}"
      " (or for a mix of methods). Use lowrank.adapters.save_adapters("
      "directory, model, format='native'), which saves every method."
  )


def save_peft(
    directory: str | os.PathLike[str],
    model: nnx.Module,
    *,
    base_model_name_or_path: str | None = None,
    convert_initialized: bool = False,
) -> None:
  """Writes `model`'s adapters as a Hugging Face PEFT adapter directory.

  Covers the methods PEFT also has: LoRA (with rsLoRA, rank/alpha patterns),
  DoRA (`use_dora`), AdaLoRA and VeRA. Other methods raise; save them with
  `lowrank.adapters.save_adapters(..., format="native")`. This is the
  `format="peft"` implementation of `lowrank.adapters.save_adapters`.

  Args:
    directory: Created if missing. Files are written atomically.
    model: A model with adapters from `lowrank.adapters.inject`.
    base_model_name_or_path: Recorded in the config for PEFT users.
    convert_initialized: For LoRA adapters whose init moved part of the base
      weight into the adapter (PiSSA, OLoRA, CorDA), save the equivalent
      rank-`2r` adapter `[A, A₀]`, `[B; −B₀]` for the *original* base weight.
      Without it such adapters raise, since PEFT users load them onto the
      original model.

  Raises:
    ValueError: If the model has no adapters, an adapter is merged, the
      method has no PEFT format, or the adapters cannot share one config.
  """
  mods = inject_lib.adapter_modules(model)
  if not mods:
    raise ValueError("The model has no adapters to save.")
  for path, m in mods.items():
    if m.merged:
      raise ValueError(f"{path}: adapter is merged; call unmerge() first.")
  peft_type = _peft_type(mods)
  if peft_type == "VERA":
    from lowrank.adapters import random_basis  # pylint: disable=g-import-not-at-top
    config, tensors = random_basis.vera_peft_state(
        mods, base_model_name_or_path=base_model_name_or_path)
    _write(directory, config, tensors)
    return
  all_paths = surgery.paths(model, opaque=(layers.LoRAWrapper,))
  rslora = {m.rslora for m in mods.values()}
  if len(rslora) != 1:
    raise ValueError("Mixed use_rslora across adapters cannot be expressed.")
  dropouts = {m.dropout.rate if m.dropout else 0.0 for m in mods.values()}
  tensors, ranks, alphas = {}, {}, {}
  for path, m in mods.items():
    if peft_type == "ADALORA":
      tensors.update(_adalora_tensors(path, m))
      ranks[path], alphas[path] = m.rank, m.alpha
    else:
      t, ranks[path], alphas[path] = _lora_tensors(
          path, m, convert_initialized)
      tensors.update(t)
  r, alpha = _most_common(ranks.values()), _most_common(alphas.values())
  config = {
      "peft_type": peft_type,
      "task_type": None,
      "base_model_name_or_path": base_model_name_or_path,
      "r": int(r),
      "lora_alpha": float(alpha),
      "use_rslora": rslora.pop(),
      "lora_dropout": float(max(dropouts)),
      "target_modules": _target_modules(sorted(mods), all_paths),
      "rank_pattern": {
          re.escape(p): int(v) for p, v in ranks.items() if v != r
      },
      "alpha_pattern": {
          re.escape(p): float(v) for p, v in alphas.items() if v != alpha
      },
      "bias": "none",
      "fan_in_fan_out": False,
      "init_lora_weights": True,
      "inference_mode": True,
      "modules_to_save": None,
      "use_dora": peft_type == "LORA" and any(
          m.method == "dora" for m in mods.values()),
      "layers_to_transform": None,
      "layers_pattern": None,
      "revision": None,
  }
  if peft_type == "ADALORA":
    first = next(iter(mods.values()))
    if len(set(ranks.values())) != 1 or config["alpha_pattern"]:
      raise ValueError(
          "PEFT AdaLoRA needs one init_r and lora_alpha for all modules."
      )
    config.update({
        "init_r": int(r),
        "target_r": int(first.target_rank if first.target_rank is not None
                        else r),
        "tinit": int(first.tinit),
        "tfinal": int(first.tfinal),
        "deltaT": int(first.delta_t),
        "total_step": first.total_step,
        "beta1": 0.85,
        "beta2": 0.85,
        "orth_reg_weight": 0.5,
        "rank_pattern": None,
        "alpha_pattern": {},
    })
  _write(directory, config, tensors)


def _write(directory, config, tensors) -> None:
  tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  os.makedirs(directory, exist_ok=True)

  def _write_json(tmp):
    with open(tmp, "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)

  atomic_write(
      os.path.join(directory, WEIGHTS_NAME),
      lambda tmp: safetensors.numpy.save_file(
          tensors, tmp, metadata={"format": "pt"}
      ),
  )
  atomic_write(os.path.join(directory, CONFIG_NAME), _write_json)


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
  """Reads and validates `adapter_config.json`.

  Raises:
    FileNotFoundError: If the file is missing.
    ValueError: If it is not JSON, not a LORA / ADALORA / VERA adapter, or
      uses an option this loader does not support (fan_in_fan_out, biases,
      modules_to_save, ...).
  """
  path = os.path.join(directory, CONFIG_NAME)
  config = read_json(path, "PEFT adapter config")
  if config.get("peft_type") not in PEFT_TYPES:
    raise ValueError(
        f"{path}: peft_type is {config.get('peft_type')!r}; supported: "
        f"{PEFT_TYPES}."
    )
  for key, ok in (
      ("fan_in_fan_out", (False, None)),
      ("bias", ("none", None)),
      ("modules_to_save", (None, [])),
      ("layers_to_transform", (None,)),
      ("layer_replication", (None,)),
      ("lora_bias", (False, None)),
      ("trainable_token_indices", (None,)),
      ("target_parameters", (None, [])),
      ("use_qalora", (False, None)),
  ):
    if config.get(key) not in ok:
      raise ValueError(f"{path}: {key}={config[key]!r} is not supported.")
  required = {"LORA": ("r",), "ADALORA": ("init_r",), "VERA": ("r",)}
  for key in required[config["peft_type"]] + ("target_modules",):
    if key not in config:
      raise ValueError(f"{path}: missing required key {key!r}.")
  return config


def _inject_from_config(config, model, rngs) -> None:
  peft_type = config["peft_type"]
  common = dict(
      targets=config["target_modules"],
      dropout=float(config.get("lora_dropout") or 0.0),
      exclude=config.get("exclude_modules"),
      rngs=rngs,
  )
  if peft_type == "LORA":
    inject_lib.inject(
        model,
        method="dora" if config.get("use_dora") else "lora",
        rank=config["r"],
        alpha=config.get("lora_alpha", 8),
        use_rslora=bool(config.get("use_rslora", False)),
        rank_pattern=config.get("rank_pattern"),
        alpha_pattern=config.get("alpha_pattern"),
        **common,
    )
  else:  # ADALORA
    inject_lib.inject(
        model,
        method="adalora",
        rank=config["init_r"],
        alpha=config.get("lora_alpha", 8),
        use_rslora=bool(config.get("use_rslora", False)),
        target_rank=config.get("target_r"),
        total_step=config.get("total_step"),
        tinit=config.get("tinit", 0),
        tfinal=config.get("tfinal", 0),
        delta_t=config.get("deltaT", 1),
        **common,
    )


def check_unmerged(mods, directory) -> None:
  """Raises if any of `mods` (path -> adapter) is merged: a load would not
  match what is folded into the base weights."""
  merged = sorted(p for p, m in mods.items() if m.merged)
  if merged:
    raise ValueError(
        f"Cannot load {directory} into merged adapters {merged[:10]}: the "
        "new values would not match what is folded into the base weights. "
        "Call lowrank.adapters.unmerge(model) first."
    )


@contextlib.contextmanager
def fits_model(subject: str) -> Iterator[None]:
  """Runs a block that builds adapters from a file's config.

  A `TypeError` (a `ValueError` otherwise) from the block is raised again
  as `"<subject> does not fit the model: <error>"`, so the message names
  the file. Used by `load_peft` and `native_io.load_adapter`.
  """
  try:
    yield
  except (TypeError, ValueError) as e:
    kind = TypeError if isinstance(e, TypeError) else ValueError
    raise kind(f"{subject} does not fit the model: {e}") from e


def check_shapes(
    tensors: Mapping[str, Any],
    expected: Mapping[str, tuple[int, ...]],
    where: str,
) -> None:
  """Raises unless `tensors[key]` has shape `expected[key]` for every key.

  Raises:
    ValueError: Naming the first mismatched tensor, both shapes and
      `where` (the weights file).
  """
  for key, want in expected.items():
    found = tuple(tensors[key].shape)
    if found != tuple(want):
      raise ValueError(
          f"{key}: expected shape {tuple(want)}, found {found} in {where}."
      )


def _expected(peft_type, path, m) -> dict[str, tuple[Any, str, tuple]]:
  """PEFT key -> (module, our role, PEFT shape) for one adapter module."""
  if peft_type == "ADALORA":
    if m.method != "adalora":
      raise ValueError(f"{path}: expected an adalora adapter, found "
                       f"{m.method!r}.")
    r = m.rank
    return {
        f"{PREFIX}{path}.lora_A": (m, "a", (r, m.d_in)),
        f"{PREFIX}{path}.lora_E": (m, "e", (r, 1)),
        f"{PREFIX}{path}.lora_B": (m, "b", (m.d_out, r)),
    }
  if m.method not in ("lora", "dora"):
    raise ValueError(f"{path}: a {m.method!r} adapter cannot load a PEFT "
                     "LORA file.")
  a_now, b_now = m.peft_factors()
  ka, kb = _keys(path, m)
  out = {ka: (m, "a", a_now.T.shape), kb: (m, "b", b_now.T.shape)}
  if m.method == "dora":
    out[f"{PREFIX}{path}.lora_magnitude_vector"] = (m, "m", (m.d_out,))
  return out


def load_peft(
    directory: str | os.PathLike[str],
    model: nnx.Module,
    *,
    rngs: nnx.Rngs | int = 0,
) -> nnx.Module:
  """Loads a PEFT LoRA / DoRA / AdaLoRA / VeRA adapter into `model`.

  If `model` has no adapters yet they are injected from the config
  (`target_modules`, `r`, `lora_alpha`, `use_rslora`, `use_dora`,
  rank/alpha patterns; AdaLoRA's `init_r` and budget schedule; VeRA's
  projections); if it has some, they must be exactly the adapters in the
  file, of the matching method.

  Args:
    directory: Holds `adapter_config.json` and `adapter_model.safetensors`.
    model: The base model (or one with matching adapters).
    rngs: Only used to initialise the factors before they are overwritten.

  Returns:
    `model`.

  Raises:
    FileNotFoundError: If a file is missing.
    ValueError: If the adapter's targets, keys or shapes do not fit `model`;
      the message names the offending tensor or module.
  """
  config = read_config(directory)
  wpath = os.path.join(directory, WEIGHTS_NAME)
  tensors = read_safetensors(wpath)
  peft_type = config["peft_type"]
  if peft_type == "VERA":
    from lowrank.adapters import random_basis  # pylint: disable=g-import-not-at-top
    return random_basis.vera_load_peft(config, tensors, model, rngs=rngs,
                                       where=wpath)
  if peft_type == "ADALORA" and config.get("rank_pattern"):
    raise ValueError(
        f"{directory}: AdaLoRA files with a rank_pattern (pruned tensors) "
        "are not supported yet; save from PEFT before its final rank "
        "allocation or resize them to init_r."
    )
  mods = inject_lib.adapter_modules(model)
  if not mods:
    with fits_model(
        f"Adapter config {os.path.join(directory, CONFIG_NAME)}"):
      _inject_from_config(config, model, rngs)
    mods = inject_lib.adapter_modules(model)
  check_unmerged(mods, directory)
  expected = {}
  for path, m in mods.items():
    expected.update(_expected(peft_type, path, m))
  unexpected = sorted(set(tensors) - set(expected))
  if unexpected:
    raise ValueError(
        f"{wpath} has tensors for modules without an adapter in the model: "
        f"{unexpected[:10]}. Adapted modules: {sorted(mods)[:20]}."
    )
  missing = sorted(set(expected) - set(tensors))
  if missing:
    raise ValueError(f"{wpath} is missing tensors: {missing[:10]}.")
  check_shapes(tensors, {k: want for k, (_, _, want) in expected.items()},
               wpath)
  for key, (m, role, _) in expected.items():
    t = tensors[key]
    if role == "a":
      layers.assign(m.lora_a, t.T)
    elif role == "b":
      layers.assign(m.lora_b, t.T)
    elif role == "e":
      layers.assign(m.lora_e, t.reshape(-1))
    else:
      layers.assign(m.magnitude, t)
  return model
