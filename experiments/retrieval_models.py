r"""The per-model parts of `experiments/finetune_retriever.py`.

`config.model.name` picks the model; what differs between them lives here
(loading, what is trained, batches, loss, evaluation, extra tables):
`"biencoder"`: all-MiniLM-L6-v2 as a `biencoder.BiEncoder`, in-batch
softmax, `evaluate.dense`; `"matryoshka"`: the same, trained with
`losses.matryoshka` over `model.matryoshka.dims` (Kusupati et al. 2022) and
evaluated at each prefix; `"colbert"`: `colbert.ColBERT` (a fresh projection
trained with the adapters; Khattab & Zaharia 2020), exact MaxSim vs MUVERA
(Dhulipala et al. 2024) in `evaluate.late_interaction`; `"splade"`:
SPLADE-tiny, `splade.splade_loss` with the FLOPS regulariser warmed up over
`model.splade.reg_warmup_steps` (Formal et al. 2021), `evaluate.sparse`.
"""

from collections.abc import Callable, Mapping, Sequence
import functools
from typing import Any

from flax import nnx
import jax
import ml_collections
import numpy as np

from lowrank import assets
from lowrank import metric_writers
from lowrank.models import bert
from lowrank.retrieval import biencoder
from lowrank.retrieval import colbert
from lowrank.retrieval import evaluate as evaluate_lib
from lowrank.retrieval import losses
from lowrank.retrieval import muvera
from lowrank.retrieval import splade

MODELS = ("biencoder", "matryoshka", "colbert", "splade")
DENSE_MODELS = ("biencoder", "matryoshka")
SPLADE_REGULARIZERS = ("flops", "l1", "idf_flops")
Config = ml_collections.ConfigDict


def prefix_dims(config: Config) -> tuple[int, ...]:
  """The evaluated prefix sizes: `eval.dims` (+ Matryoshka's), largest first."""
  m = config.model
  dims = set(config.eval.dims) | set(
      m.matryoshka.dims if m.name == "matryoshka" else ())
  return tuple(sorted(dims, reverse=True)) if m.name in DENSE_MODELS else ()


def fde_config(config: Config) -> muvera.FDEConfig:
  """MUVERA's FDE parameters (`eval.muvera`; a size of 0 means none)."""
  kwargs = {k: v or None if k.endswith("_dim") else v
            for k, v in config.eval.muvera.items() if k != "rerank"}
  return muvera.FDEConfig(dimension=config.model.colbert.dim, **kwargs)


def load_model(config: Config) -> tuple[nnx.Module, bert.Tokenizer]:
  """The pretrained model of `config.model` (eval mode) and its tokenizer.

  Call it under the training mesh; ColBERT's projection is seeded by
  `config.seed`.
  """
  m = config.model
  path = m.path or (assets.splade_tiny_path() if m.name == "splade"
                    else assets.minilm_path())
  tokenizer = bert.load_tokenizer(path)
  if m.name == "splade":  # evaluate.sparse checks for the MLM head.
    model = bert.load_pretrained(path)
  elif m.name == "colbert":
    model = colbert.ColBERT(
        bert.load_pretrained(path), tokenizer, dim=m.colbert.dim,
        query_maxlen=config.data.query_max_length,
        doc_maxlen=config.data.doc_max_length,
        attend_to_mask_tokens=m.colbert.attend_to_mask_tokens,
        projection_init=m.colbert.projection_init, rngs=config.seed)
  else:
    model = biencoder.BiEncoder(
        bert.load_pretrained(path),
        bert.load_pretrained(path) if m.towers == "separate" else None,
        pooling=m.pooling, scale=m.scale, learn_scale=m.learn_scale,
        max_scale=m.max_scale)
  model.eval()
  return model, tokenizer


def trainable(config: Config, model: nnx.Module) -> Any:
  """What is trained: every `nnx.Param` (method "full") or the adapters'
  `nnx.LoRAParam`s, plus ColBERT's fresh projection or a learned scale."""
  adapted = config.adapter.method != "full"
  if isinstance(model, biencoder.BiEncoder):
    return biencoder.trainable_filter(model, adapted)
  if adapted and isinstance(model, colbert.ColBERT):
    return colbert.ADAPTERS_AND_PROJECTION
  return nnx.LoRAParam if adapted else nnx.Param


def make_batch_fn(config: Config, model: nnx.Module, tokenizer: Any,
                  pairs: Sequence[tuple[str, str]]) -> Callable[[int], dict]:
  """`step -> batch` (1-based), a seeded permutation of `pairs` per epoch.

  Tokenized `queries` and their positive `documents` in fixed shapes
  (ColBERT: its markers and `[MASK]` padding); SPLADE's also the `step`.
  """
  b, lq, ld = (config.train.batch_size, config.data.query_max_length,
               config.data.doc_max_length)
  per_epoch = len(pairs) // b

  def batch_fn(step: int) -> dict[str, Any]:
    epoch, i = divmod(step - 1, per_epoch)
    perm = np.random.default_rng([config.seed, epoch]).permutation(
        len(pairs))
    queries, docs = zip(*(pairs[j] for j in perm[i * b:(i + 1) * b]))
    if isinstance(model, colbert.ColBERT):
      out = {"queries": model.tokenize_queries(list(queries)),
             "documents": model.tokenize_documents(list(docs), length=ld)}
    else:
      out = {"queries": tokenizer(list(queries), max_length=lq, pad_to=lq),
             "documents": tokenizer(list(docs), max_length=ld, pad_to=ld)}
    out = {k: dict(v) for k, v in out.items()}
    if config.model.name == "splade":  # Only where the loss reads it.
      out["step"] = np.int32(step)
    return out
  return batch_fn


def make_loss(config: Config, tokenizer: Any, train_docs: Sequence[str] = (),
              ) -> Callable[[nnx.Module, dict], tuple[jax.Array, dict]]:
  """`loss(model, batch) -> (loss, aux)`: in-batch negatives; jittable.

  `aux`: extra scalars to log (a learned scale; SPLADE's loss terms and
  weights). `train_docs`: the IDF corpus of SPLADE's `idf_flops`.
  """
  m = config.model
  if m.name in DENSE_MODELS:
    dims = tuple(m.matryoshka.dims)
    weights = tuple(float(w) for w in m.matryoshka.weights) or None
    normalize = m.name == "biencoder"  # Matryoshka normalises each prefix.

    def dense_loss(model, batch):
      q = bert.encode(model.query_encoder, batch["queries"], model.pooling,
                      normalize)
      d = bert.encode(model.document_encoder, batch["documents"],
                      model.pooling, normalize)
      loss = functools.partial(losses.in_batch_softmax, scale=model.scale(),
                               symmetric=m.symmetric, same_side=m.same_side)
      aux = {"logit_scale": model.scale()} if m.learn_scale else {}
      if m.name == "matryoshka":
        return losses.matryoshka(loss, q, d, dims, weights), aux
      return loss(q, d), aux
    return dense_loss

  if m.name == "colbert":
    def colbert_loss(model, batch):
      q, q_mask = model.encode_queries(batch["queries"])
      d, d_mask = model.encode_documents(batch["documents"])
      return colbert.in_batch_loss(q, q_mask, d, d_mask,
                                   scale=float(m.colbert.scale)), {}
    return colbert_loss

  s = m.splade
  schedule = splade.RegWeightScheduler(
      lambda_q=float(s.lambda_q), lambda_d=float(s.lambda_d),
      warmup_steps_q=s.reg_warmup_steps, warmup_steps_d=s.reg_warmup_steps)
  idf = None
  if s.regularizer == "idf_flops":
    docs = sorted(set(train_docs))
    if not docs:
      raise ValueError("model.splade.regularizer='idf_flops' needs training "
                       "documents (its IDF corpus); got none.")
    idf = splade.token_idf(tokenizer, docs,
                           max_length=config.data.doc_max_length)

  def splade_loss(model, batch):
    lambda_q, lambda_d = schedule(batch["step"])
    loss, aux = splade.splade_loss(
        splade.encode(model, batch["queries"]),
        splade.encode(model, batch["documents"]), lambda_q=lambda_q,
        lambda_d=lambda_d, regularizer=s.regularizer, idf=idf,
        scale=float(s.scale))
    return loss, dict(aux, lambda_q=lambda_q, lambda_d=lambda_d)
  return splade_loss


def evaluate(model: nnx.Module, tokenizer: Any, dataset: Any,
             config: Config) -> evaluate_lib.Result:
  """`(metrics, info)` on `dataset` (`lowrank.retrieval.evaluate`)."""
  e, d = config.eval, config.data
  if isinstance(model, colbert.ColBERT):
    return evaluate_lib.late_interaction(
        model, dataset, k=e.k, batch_size=e.batch_size,
        fde=fde_config(config), rerank=e.muvera.rerank)
  fn = (functools.partial(evaluate_lib.dense, prefix_dims=prefix_dims(config))
        if isinstance(model, biencoder.BiEncoder) else evaluate_lib.sparse)
  return fn(model, tokenizer, dataset, k=e.k, batch_size=e.batch_size,
            query_max_length=d.query_max_length,
            doc_max_length=d.doc_max_length)


# ----------------------------------------------------------------------------
# Reporting.


def format_extra(r: Mapping[str, Any]) -> str:
  """Markdown: zero-shot -> final of every metric variant and info number.

  Variants are the prefix sizes (`*@384`), MUVERA (`muvera_*`) and the FDE
  alone (`fde_*`); the info holds the evaluation's times and sizes.
  """
  z, f = r["zero_shot"], r["final"]
  zi, fi = r.get("zero_shot_info") or {}, r.get("final_info") or {}
  variants = {k.replace("ndcg_cut_10", "{}") for k in f if "ndcg_cut_10" in k}
  order = lambda v: (v.split("@")[0], -int(v.split("@")[1] if "@" in v else 0))
  rows = [[v.format("*"), *(
      f"{z.get(v.format(n), float('nan')):.4f} -> {f[v.format(n)]:.4f}"
      for n in ("ndcg_cut_10", "recall_100"))]
          for v in sorted(variants - {"{}"}, key=order)]
  parts = [f"{r['model']}: zero-shot -> final of each variant\n\n"
           + metric_writers.markdown_table(
               ["variant", "nDCG@10", "Recall@100"], rows)] if rows else []
  numbers = sorted(k for k, v in fi.items() if isinstance(v, (int, float)))
  return "\n\n".join(parts + [metric_writers.markdown_table(
      ["evaluation info", "zero-shot", "final"],
      [[k, f"{zi.get(k, float('nan')):.4g}", f"{fi[k]:.4g}"]
       for k in numbers])])
