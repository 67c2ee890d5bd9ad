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
import json
import os
import re
import tempfile
from typing import Any

from flax import nnx
import numpy as np
import safetensors.numpy

from lowrank.adapters import injection as inject_lib
from lowrank.adapters import layers

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


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


def _atomic_write(path: str, write_fn) -> None:
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


def save_peft(
    directory: str | os.PathLike[str],
    model: nnx.Module,
    *,
    base_model_name_or_path: str | None = None,
) -> None:
  """Writes `model`'s LoRA adapters as a Hugging Face PEFT adapter directory.

  Args:
    directory: Created if missing. Files are written atomically.
    model: A model with adapters from `lowrank.adapters.inject`.
    base_model_name_or_path: Recorded in the config for PEFT users.

  Raises:
    ValueError: If the model has no adapters, an adapter is merged, or the
      adapters are not all plain LoRA.
  """
  mods = inject_lib.adapter_modules(model)
  if not mods:
    raise ValueError("The model has no adapters to save.")
  for path, m in mods.items():
    if m.method != "lora":
      raise ValueError(f"{path}: PEFT LORA export supports plain LoRA only.")
    if m.merged:
      raise ValueError(f"{path}: adapter is merged; call unmerge() first.")
  ranks = {p: m.rank for p, m in mods.items()}
  alphas = {p: m.alpha for p, m in mods.items()}
  rslora = {m.rslora for m in mods.values()}
  if len(rslora) != 1:
    raise ValueError("Mixed use_rslora across adapters cannot be expressed.")
  r, alpha = _most_common(ranks.values()), _most_common(alphas.values())
  all_paths = [
      inject_lib.path_str(p) for p, _ in inject_lib._walk(model) if p  # pylint: disable=protected-access
  ]
  dropouts = {m.dropout.rate if m.dropout else 0.0 for m in mods.values()}
  config = {
      "peft_type": "LORA",
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
      "use_dora": False,
      "layers_to_transform": None,
      "layers_pattern": None,
      "revision": None,
  }
  tensors = {}
  for path, m in mods.items():
    a, b = m.peft_factors()
    ka, kb = _keys(path, m)
    tensors[ka] = np.ascontiguousarray(np.asarray(a, np.float32).T)
    tensors[kb] = np.ascontiguousarray(np.asarray(b, np.float32).T)
  os.makedirs(directory, exist_ok=True)

  def _write_json(tmp):
    with open(tmp, "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)

  _atomic_write(
      os.path.join(directory, WEIGHTS_NAME),
      lambda tmp: safetensors.numpy.save_file(
          tensors, tmp, metadata={"format": "pt"}
      ),
  )
  _atomic_write(os.path.join(directory, CONFIG_NAME), _write_json)


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
  """Reads and validates `adapter_config.json`.

  Raises:
    FileNotFoundError: If the file is missing.
    ValueError: If it is not JSON, not a LORA adapter, or uses an option this
      loader does not support (DoRA, fan_in_fan_out, biases, ...).
  """
  path = os.path.join(directory, CONFIG_NAME)
  if not os.path.exists(path):
    raise FileNotFoundError(f"No {CONFIG_NAME} in {directory}.")
  try:
    with open(path) as f:
      config = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from e
  if config.get("peft_type") != "LORA":
    raise ValueError(
        f"{path}: peft_type is {config.get('peft_type')!r}; only 'LORA' is "
        "supported."
    )
  for key, ok in (
      ("use_dora", (False, None)),
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
  for key in ("r", "target_modules"):
    if key not in config:
      raise ValueError(f"{path}: missing required key {key!r}.")
  return config


def load_peft(
    directory: str | os.PathLike[str],
    model: nnx.Module,
    *,
    rngs: nnx.Rngs | int = 0,
) -> nnx.Module:
  """Loads a PEFT LoRA adapter directory into `model` (in place).

  If `model` has no adapters yet they are injected from the config
  (`target_modules`, `r`, `lora_alpha`, `use_rslora`, rank/alpha patterns);
  if it has some, they must be exactly the adapters in the file.

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
  if not os.path.exists(wpath):
    raise FileNotFoundError(f"No {WEIGHTS_NAME} in {directory}.")
  tensors = safetensors.numpy.load_file(wpath)
  mods = inject_lib.adapter_modules(model)
  if not mods:
    targets = config["target_modules"]
    try:
      inject_lib.inject(
          model,
          targets=targets,
          rank=int(config["r"]),
          alpha=config.get("lora_alpha", 8),
          use_rslora=bool(config.get("use_rslora", False)),
          dropout=float(config.get("lora_dropout") or 0.0),
          exclude=config.get("exclude_modules"),
          rank_pattern=config.get("rank_pattern"),
          alpha_pattern=config.get("alpha_pattern"),
          rngs=rngs,
      )
    except ValueError as e:
      raise ValueError(
          f"Adapter in {directory} does not fit the model: {e}"
      ) from e
    mods = inject_lib.adapter_modules(model)
  expected = {}
  for path, m in mods.items():
    ka, kb = _keys(path, m)
    expected[ka], expected[kb] = (m, "a"), (m, "b")
  unexpected = sorted(set(tensors) - set(expected))
  if unexpected:
    raise ValueError(
        f"{wpath} has tensors for modules without an adapter in the model: "
        f"{unexpected[:10]}. Adapted modules: {sorted(mods)[:20]}."
    )
  missing = sorted(set(expected) - set(tensors))
  if missing:
    raise ValueError(f"{wpath} is missing tensors: {missing[:10]}.")
  for path, m in mods.items():
    ka, kb = _keys(path, m)
    a_now, b_now = m.peft_factors()
    a_file, b_file = tensors[ka], tensors[kb]
    for key, found, want in (
        (ka, a_file.shape, a_now.T.shape),
        (kb, b_file.shape, b_now.T.shape),
    ):
      if tuple(found) != tuple(want):
        raise ValueError(
            f"{key}: expected shape {tuple(want)}, found {tuple(found)} in "
            f"{wpath}."
        )
    m.set_peft_factors(a_file.T, b_file.T)
  return model
