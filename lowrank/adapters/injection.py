"""Injecting adapters into an existing NNX model without editing its source.

`inject(model, targets=..., rank=...)` walks the model graph, picks the
modules whose dotted path matches `targets`, and replaces each in place by a
wrapper from `lowrank.adapters.layers` that keeps the original module as
`base`. Paths are the NNX graph paths joined with dots
(`encoder.layer.0.attention.self.query`), which for models that mirror
Hugging Face attribute names are exactly PEFT's module names.

Target semantics follow PEFT:
  * a `str` is a regular expression that must match the *whole* path
    (`re.fullmatch`), e.g. `r".*\\.(query|value)"`;
  * a list of names matches a path equal to a name or ending in `.name`;
  * `"all-linear"` picks every `Linear`, `LinearGeneral` and `Einsum`.
`rank_pattern` / `alpha_pattern` map a regex to a per-module rank / alpha,
matched as PEFT does: `re.match(rf"(.*\\.)?({pattern})$", path)`.
"""

from collections.abc import Callable, Iterator, Mapping, Sequence
import contextlib
from typing import Any

from flax import nnx
import jax

from lowrank.adapters import layers
from lowrank.adapters import lora
from lowrank import surgery

# method name -> module type -> wrapper class (`layers.register` adds to it).
METHODS = layers.METHODS


path_str = surgery.path_str

# `inject(..., quantize_base=scheme)` delegates to the function registered
# here: `lowrank.adapters.quantized.inject_quantized`, which builds on this
# module (so this module does not import it).
_BASE_QUANTIZER: list[Callable[..., nnx.Module]] = []


def register_base_quantizer(fn: Callable[..., nnx.Module]) -> None:
  """Sets the function that runs `inject(..., quantize_base=scheme)`.

  Args:
    fn: Called as `fn(model, targets=, scheme=, init=, exclude=, method=,
      rank=, alpha=, dropout=, init_data=, use_rslora=, rank_pattern=,
      alpha_pattern=, rngs=, **method_options)`; it returns the model.
      `lowrank.adapters.quantized` registers `inject_quantized` when
      imported. A later registration replaces an earlier one.
  """
  _BASE_QUANTIZER[:] = [fn]


def adapter_modules(model: nnx.Module) -> dict[str, layers.LoRAWrapper]:
  """Dotted path -> adapter wrapper, for every adapter in `model`."""
  return {
      path_str(p): m
      for p, m in surgery.iter_modules(
          model, kind=layers.LoRAWrapper, opaque=(layers.LoRAWrapper,),
          include_root=True)
  }


def pattern_value(patterns: Any, path: str, default):
  """PEFT's `rank_pattern` / `alpha_pattern` lookup for one module path.

  `patterns` is `None` or anything with `items()` (a dict, a ConfigDict).
  """
  for pattern, value in (patterns or {}).items():
    rx = surgery.compile_regex(rf"(.*\.)?({pattern})$", "pattern")
    if rx.match(path):
      return value
  return default


def _check_hyperparameters(rank, alpha, rank_pattern, alpha_pattern) -> None:
  """Type and range checks of `inject`'s rank / alpha arguments.

  Raises:
    TypeError: A rank that is not an int (`2.5`, `True`, `None`, `"8"`), an
      alpha that is not a real number, or a pattern that is not a mapping.
    ValueError: A rank below 1 or a non-finite alpha.
  """
  rank = lora.check_rank(rank)
  lora.check_alpha(alpha, rank)
  for what, patterns in (("rank_pattern", rank_pattern),
                         ("alpha_pattern", alpha_pattern)):
    # Duck-typed: ml_collections' ConfigDict is no `Mapping` but has items().
    if patterns is not None and not callable(getattr(patterns, "items", None)):
      raise TypeError(
          f"{what} must be a dict {{regex: value}} or None; got "
          f"{patterns!r} of type {type(patterns).__name__}."
      )
  for pattern, value in (rank_pattern or {}).items():
    surgery.compile_regex(pattern, "rank_pattern")
    lora.check_rank(value, name=f"rank_pattern[{pattern!r}]")
  for pattern, value in (alpha_pattern or {}).items():
    surgery.compile_regex(pattern, "alpha_pattern")
    lora.check_alpha(value, rank, name=f"alpha_pattern[{pattern!r}]")


def inject(
    model: nnx.Module,
    *,
    targets: str | Sequence[str],
    method: str = "lora",
    # rank, alpha, dropout and the patterns are checked by hand: the errors
    # then name the argument and the way out.
    rank,
    alpha=None,
    dropout=0.0,
    init: str = "kaiming",
    init_data: Mapping[str, Any] | None = None,
    use_rslora: bool = False,
    exclude: str | Sequence[str] | None = None,
    rank_pattern=None,
    alpha_pattern=None,
    rngs: nnx.Rngs | int = 0,
    quantize_base: str | None = None,
    **method_options,
) -> nnx.Module:
  """Adds adapters to the modules of `model` whose path matches `targets`.

  Modifies `model` in place and returns it. Train the result with
  `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)` or
  `nnx.split(model, nnx.LoRAParam, ...)`; the base weights stay `nnx.Param`.

  Args:
    model: Any NNX model built from `nnx.Linear`, `nnx.LinearGeneral`,
      `nnx.Einsum` or `nnx.Embed` submodules.
    targets: Which modules (see the module docstring for the semantics).
    method: Adapter family (`"lora"`; variants register in `METHODS`).
    rank: Adapter rank `r`, a positive int (Python or NumPy integer).
    alpha: `lora_alpha`, a finite number; default `rank` (scale 1).
    dropout: Dropout rate in `[0, 1)` on the adapter input (active in
      `model.train()` mode).
    init: `"kaiming"` (PEFT default) or `"gaussian"` for `A` with `B = 0`,
      or a data/SVD initialisation registered in `layers.INITIALIZERS`
      (`"pissa"`, `"olora"`, `"corda"`, `"lora_sb"`, ...), which is applied
      after the wrapper is built.
    init_data: `{module path: data}` for inits that need data per module
      (CorDA's input covariance, LoRA-SB's first gradient).
    use_rslora: Scale `alpha / sqrt(r)` instead of `alpha / r`.
    exclude: Modules to leave alone even if they match `targets`.
    rank_pattern: `{regex: rank}` overrides (ints), PEFT semantics.
    alpha_pattern: `{regex: alpha}` overrides (numbers), PEFT semantics.
    rngs: `nnx.Rngs` or an int seed for the adapter initialisation.
    quantize_base: `"nf4"` or `"int8"`: first replace the targeted base
      layers by frozen block-quantised ones that dequantise on the fly
      (QLoRA; see `lowrank.adapters.quantized`). With `init="lq_lora"` the
      base becomes `Q(W − L₁L₂)` (LQ-LoRA).
    **method_options: Passed to the wrapper class of `method`.

  Returns:
    `model`, with adapters.

  Raises:
    TypeError: If `rank` (or a `rank_pattern` value) is not an int, or
      `alpha` (or an `alpha_pattern` value) is not a real number.
    ValueError: On a bad regex, a target that matches nothing, a matched
      module that cannot be adapted, or bad hyperparameters (rank < 1,
      non-finite alpha, ...); the message lists the module paths that exist.
  """
  if method not in METHODS:
    raise ValueError(f"Unknown method {method!r}; known: {sorted(METHODS)}.")
  _check_hyperparameters(rank, alpha, rank_pattern, alpha_pattern)
  if quantize_base is not None:
    if not _BASE_QUANTIZER:
      raise ValueError(
          f"quantize_base={quantize_base!r} needs a quantizer; none is "
          "registered. Import lowrank.adapters (its quantized module "
          "registers one), or call register_base_quantizer."
      )
    return _BASE_QUANTIZER[0](
        model, targets=targets, scheme=quantize_base, init=init,
        exclude=exclude, method=method, rank=rank, alpha=alpha,
        dropout=dropout, init_data=init_data, use_rslora=use_rslora,
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, rngs=rngs,
        **method_options)
  data_init = layers.INITIALIZERS.get(init)
  if data_init is None and init not in lora.INITS:
    raise ValueError(
        f"Unknown init {init!r}; known: "
        f"{sorted(set(lora.INITS) | set(layers.INITIALIZERS))}."
    )
  rngs = nnx.Rngs(rngs) if isinstance(rngs, int) else rngs
  match = surgery.match(targets, "targets", wrappers=(layers.LoRAWrapper,))
  skip = (lambda p, m: False) if exclude is None else surgery.match(
      exclude, "exclude"
  )
  modules = list(surgery.iter_modules(model, opaque=(layers.LoRAWrapper,)))
  all_paths = [path_str(p) for p, _ in modules]
  adaptable = [
      path_str(p)
      for p, m in modules
      if layers.wrapper_for(m, method) is not None
      and not isinstance(m, layers.LoRAWrapper)
  ]
  chosen, unadaptable = [], []
  for p, m in modules:
    name = path_str(p)
    if not match(name, m) or skip(name, m):
      continue
    if isinstance(m, layers.LoRAWrapper):
      raise ValueError(f"Module {name!r} already has an adapter.")
    cls = layers.wrapper_for(m, method)
    if cls is None:
      unadaptable.append(f"{name} ({type(m).__name__})")
    else:
      chosen.append((p, m, cls))
  if unadaptable:
    raise ValueError(
        f"targets={targets!r} matched modules that method {method!r} cannot "
        f"adapt: {surgery.listing(unadaptable)}. Adaptable modules: "
        f"{surgery.listing(adaptable)}."
    )
  if not chosen:
    raise ValueError(
        f"targets={targets!r} matched no module. Adaptable modules: "
        f"{surgery.listing(adaptable)}. All module paths: "
        f"{surgery.listing(all_paths)}."
    )
  if init_data is not None:
    names = {path_str(p) for p, _, _ in chosen}
    extra = sorted(set(init_data) - names)
    if extra:
      raise ValueError(
          f"init_data has entries for modules that are not adapted: "
          f"{surgery.listing(extra)}. Adapted: {surgery.listing(sorted(names))}."
      )
  for p, m, cls in chosen:
    name = path_str(p)
    new = cls(
        m,
        rank=pattern_value(rank_pattern, name, rank),
        alpha=pattern_value(alpha_pattern, name, alpha),
        rslora=use_rslora,
        dropout=dropout,
        init="kaiming" if data_init is not None else init,
        rngs=rngs,
        **method_options,
    )
    if data_init is not None:
      before = new.kernel_2d()
      try:
        data_init(new, (init_data or {}).get(name), rngs.params())
      except AttributeError as e:
        raise ValueError(
            f"init {init!r} does not apply to method {method!r} ({name}): "
            f"{e}."
        ) from e
      new.init = init
      if not bool(jax.numpy.array_equal(before, new.kernel_2d())):
        new.snapshot_initial()
    surgery.set_submodule(model, p, new)
  return model


def merge(model: nnx.Module) -> nnx.Module:
  """Folds every adapter into its base weight in place (see `unmerge`)."""
  for m in adapter_modules(model).values():
    m.merge()
  return model


def unmerge(model: nnx.Module) -> nnx.Module:
  """Subtracts every merged adapter back out of its base weight, in place.

  Each adapter subtracts exactly the update its `merge` added (see
  `LoRAWrapper.unmerge`), so the base weights come back even if the model
  was trained while merged; one `UserWarning` then lists the adapters whose
  values changed since `merge`.
  """
  changed = {}
  for name, m in adapter_modules(model).items():
    names = m.unmerge_exact()
    if names:
      changed[name] = names
  if changed:
    layers.warn_changed_while_merged(changed, stacklevel=2)
  return model


def unload(model: nnx.Module, *, merge_first: bool = True) -> nnx.Module:
  """Replaces every wrapper by its base module (merged first by default)."""
  changed = {}
  for name, m in adapter_modules(model).items():
    if merge_first:
      m.merge()
    elif m.merged:
      names = m.unmerge_exact()
      if names:
        changed[name] = names
    path = tuple(int(p) if p.isdigit() else p for p in name.split("."))
    surgery.set_submodule(model, path, m.base)
  if changed:
    layers.warn_changed_while_merged(changed, stacklevel=2)
  return model


@contextlib.contextmanager
def disabled(model: nnx.Module) -> Iterator[nnx.Module]:
  """Context in which all adapters are bypassed (the base model runs)."""
  mods = adapter_modules(model).values()
  previous = [m.enabled for m in mods]
  for m in mods:
    m.enabled = False
  try:
    yield model
  finally:
    for m, e in zip(mods, previous):
      m.enabled = e


def count_parameters(model: nnx.Module) -> dict[str, int]:
  """`{"trainable": adapter params, "total": all params}` (element counts)."""
  def _count(filter_):
    state = nnx.state(model, filter_)
    return sum(x.size for x in jax.tree.leaves(nnx.to_pure_dict(state)))

  return {"trainable": _count(nnx.LoRAParam), "total": _count(nnx.Param)}
