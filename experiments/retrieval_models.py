r"""The per-model parts of `experiments/finetune_retriever.py`.

`config.model` picks one of four retrieval models; everything that differs
between them lives here (loading, the trainable-parameter filter,
tokenisation of training batches, the loss, evaluation, the extra result
tables), so the binary's training loop (optimizer, sharding, checkpoints,
logging) is shared:

- `"biencoder"` (default): all-MiniLM-L6-v2, `config.pooling` pooling,
  L2-normalised embeddings, in-batch softmax (InfoNCE) with logit scale
  `config.scale`. Evaluation: exact inner-product top-k
  (`lowrank.retrieval.search`), nDCG@10, Recall@10 and Recall@100; with
  `config.eval_dims` also nDCG@10 / Recall@100 of every embedding prefix of
  those sizes (truncate + renormalise), keys `"ndcg_cut_10@64"`, ...
- `"matryoshka"`: the same encoder trained with
  `lowrank.retrieval.losses.matryoshka` (the in-batch softmax summed over
  the prefixes `config.matryoshka.dims`, each truncated and renormalised,
  weighted by `config.matryoshka.weights`; Kusupati et al. 2022,
  https://arxiv.org/abs/2205.13147). Evaluated like the bi-encoder, at
  every prefix of `dims` (and of `eval_dims`).
- `"colbert"`: `lowrank.retrieval.colbert.ColBERT` over MiniLM (a fresh
  `config.colbert.dim`-d projection, `[Q]`/`[D]` markers, query `[MASK]`
  augmentation to `config.query_max_length`, punctuation skiplist), trained
  with `colbert.in_batch_loss` (Khattab & Zaharia 2020,
  https://arxiv.org/abs/2004.12832). Evaluation: exact MaxSim top-k
  (`colbert.search_exact`) and MUVERA (Dhulipala et al. 2024,
  https://arxiv.org/abs/2405.19504): document FDEs (`colbert.encode_fdes`),
  FDE top-`rerank` candidates, exact MaxSim rerank (`colbert.search_muvera`);
  plus the FDE ranking alone. Keys `"ndcg_cut_10"` ... (exact),
  `"muvera_ndcg_cut_10"` ... (FDE + rerank), `"fde_ndcg_cut_10"` ... (FDE
  only); the times go to the evaluation info.
- `"splade"`: the offline SPLADE-tiny MLM encoder (`lowrank.assets`), max-
  pooled `log(1 + relu)` term weights, trained with `splade.splade_loss`
  (in-batch softmax over sparse dot products plus the FLOPS regulariser
  whose query / document weights grow quadratically over
  `config.splade.reg_warmup_steps`; Formal et al. 2021,
  https://arxiv.org/abs/2107.05720). Evaluation through the inverted index
  (`lowrank.retrieval.sparse_index`); the info holds the average number of
  non-zero terms per query and per document and the expected FLOPS.

Every evaluation returns `(metrics, info)`: `metrics` a flat dict of floats
(trec_eval measures averaged over the qrels' queries), `info` the timings
(seconds, wall clock, compilation included) and sizes.
"""

from collections.abc import Callable, Mapping, Sequence
import functools
import os
import time
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lowrank import assets
from lowrank import sharding
from lowrank.models import bert
from lowrank.retrieval import biencoder
from lowrank.retrieval import colbert
from lowrank.retrieval import losses
from lowrank.retrieval import metrics as metrics_lib
from lowrank.retrieval import muvera
from lowrank.retrieval import search
from lowrank.retrieval import sparse_index
from lowrank.retrieval import splade

MODELS = ("biencoder", "matryoshka", "colbert", "splade")
DENSE_MODELS = ("biencoder", "matryoshka")
EVAL_METRICS = ("ndcg_cut_10", "recall_10", "recall_100")
# Measures reported at every embedding prefix size.
PREFIX_METRICS = ("ndcg_cut_10", "recall_100")
SPLADE_REGULARIZERS = ("flops", "l1", "idf_flops")

# `(queries, documents) -> (query batch, document batch)` of numpy arrays.
Tokenize = Callable[[list[str], list[str]], tuple[dict, dict]]


# ----------------------------------------------------------------------------
# Configuration.


def _ints(name: str, values: Any) -> tuple[int, ...]:
  values = tuple(values)
  if not all(isinstance(v, (int, np.integer)) and v >= 1 for v in values):
    raise ValueError(f"{name} must hold positive ints; got {values!r}.")
  return tuple(int(v) for v in values)


def prefix_dims(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The prefix sizes the evaluation reports, largest first.

  `config.eval_dims`, plus `config.matryoshka.dims` for the Matryoshka
  model; `()` for the others.
  """
  if config.model not in DENSE_MODELS:
    return ()
  dims = set(_ints("eval_dims", config.eval_dims))
  if config.model == "matryoshka":
    dims |= set(_ints("matryoshka.dims", config.matryoshka.dims))
  return tuple(sorted(dims, reverse=True))


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the model-specific options before anything is loaded.

  Raises:
    ValueError: On an unknown `config.model`, an option that does not apply
      to the chosen model (`symmetric` or `eval_dims` for ColBERT / SPLADE),
      or an invalid model option (empty Matryoshka dims, a weight count that
      differs from the dims, a negative SPLADE regulariser weight, an unknown
      regulariser, non-positive ColBERT / MUVERA sizes).
  """
  model = config.model
  if model not in MODELS:
    raise ValueError(f"Unknown model {model!r}; expected one of {MODELS}.")
  if model not in DENSE_MODELS:
    if config.symmetric:
      raise ValueError(
          f"symmetric=True applies to the bi-encoder losses only; model "
          f"{model!r} has no document->query term."
      )
    if tuple(config.eval_dims):
      raise ValueError(
          f"eval_dims (prefix evaluation) applies to the dense models "
          f"{DENSE_MODELS}; got eval_dims={tuple(config.eval_dims)} with "
          f"model {model!r}."
      )
  _ints("eval_dims", config.eval_dims)
  if config.towers not in biencoder.TOWERS:
    raise ValueError(
        f"towers must be one of {biencoder.TOWERS}; got {config.towers!r}."
    )
  options = dict(towers=config.towers != "shared",
                 learn_scale=bool(config.learn_scale),
                 same_side=bool(config.same_side))
  used = [k for k, v in options.items() if v]
  if model not in DENSE_MODELS and used:
    raise ValueError(
        f"{used} apply to the bi-encoder models {DENSE_MODELS}; got model "
        f"{model!r}."
    )
  if config.learn_scale and not 0 < config.scale <= config.max_scale:
    raise ValueError(
        f"learn_scale needs 0 < scale <= max_scale; got scale={config.scale}, "
        f"max_scale={config.max_scale}."
    )
  if model == "matryoshka":
    dims = _ints("matryoshka.dims", config.matryoshka.dims)
    if not dims:
      raise ValueError("matryoshka.dims must name at least one prefix size.")
    weights = tuple(config.matryoshka.weights)
    if weights and len(weights) != len(dims):
      raise ValueError(
          f"matryoshka.weights has {len(weights)} entries for "
          f"{len(dims)} dims {dims}; give one per dim or () for all 1."
      )
  if model == "colbert":
    c = config.colbert
    _ints("colbert.dim", (c.dim,))
    m = c.muvera
    _ints("colbert.muvera.rerank", (m.rerank,))
    fde_config(config)  # Validates the FDE sizes.
  if model == "splade":
    s = config.splade
    if s.regularizer not in SPLADE_REGULARIZERS:
      raise ValueError(
          f"Unknown splade.regularizer {s.regularizer!r}; expected one of "
          f"{SPLADE_REGULARIZERS}."
      )
    if s.lambda_q < 0 or s.lambda_d < 0 or s.reg_warmup_steps < 0:
      raise ValueError(
          f"splade.lambda_q, lambda_d and reg_warmup_steps must be >= 0; got "
          f"{s.lambda_q}, {s.lambda_d}, {s.reg_warmup_steps}."
      )


def fde_config(config: ml_collections.ConfigDict) -> muvera.FDEConfig:
  """The MUVERA FDE parameters of `config.colbert.muvera`.

  `projection_dim` / `final_projection_dim` of 0 mean none (identity
  projection / no final Count-Sketch).
  """
  m = config.colbert.muvera
  return muvera.FDEConfig(
      dimension=int(config.colbert.dim),
      num_repetitions=int(m.num_repetitions),
      num_simhash_projections=int(m.num_simhash_projections),
      projection_dim=int(m.projection_dim) or None,
      fill_empty_partitions=bool(m.fill_empty_partitions),
      final_projection_dim=int(m.final_projection_dim) or None,
      seed=int(m.seed),
  )


# ----------------------------------------------------------------------------
# Model, trainable parameters, batches.


def load_model(
    config: ml_collections.ConfigDict,
) -> tuple[nnx.Module, bert.Tokenizer]:
  """The pretrained model of `config.model`, in eval mode, and its tokenizer.

  `config.model_path` ("" = bundled all-MiniLM-L6-v2, or SPLADE-tiny for
  `"splade"`) is a HF-format BERT directory. ColBERT wraps the encoder in a
  fresh projection (seeded by `config.seed`). Call under the training mesh.

  Raises:
    ValueError: If the Matryoshka / prefix sizes exceed the embedding size,
      or a SPLADE checkpoint has no masked-LM head.
  """
  if config.model == "splade":
    path = config.model_path or assets.splade_tiny_path()
  else:
    path = config.model_path or assets.minilm_path()
  encoder = bert.load_pretrained(path)
  tokenizer = bert.load_tokenizer(path)
  if config.model == "splade":
    if not encoder.config.add_mlm_head:
      raise ValueError(
          f"model='splade' needs a masked-LM checkpoint (BertForMaskedLM); "
          f"{path} has no MLM head."
      )
    return encoder, tokenizer
  if config.model == "colbert":
    model = colbert.ColBERT(
        encoder, tokenizer, dim=int(config.colbert.dim),
        query_maxlen=int(config.query_max_length),
        doc_maxlen=int(config.doc_max_length),
        attend_to_mask_tokens=bool(config.colbert.attend_to_mask_tokens),
        projection_init=config.colbert.projection_init,
        rngs=int(config.seed),
    )
    model.eval()
    return model, tokenizer
  hidden = encoder.config.hidden_size
  too_big = [m for m in prefix_dims(config) if m > hidden]
  if too_big:
    raise ValueError(
        f"Prefix sizes {too_big} exceed the embedding size {hidden} of "
        f"{path}."
    )
  if config.towers == "shared" and not config.learn_scale:
    return encoder, tokenizer  # Plain BERT: the default, bit for bit.
  doc_encoder = (bert.load_pretrained(path)
                 if config.towers == "separate" else None)
  model = biencoder.BiEncoder(
      encoder, doc_encoder, pooling=config.pooling,
      scale=float(config.scale), learn_scale=bool(config.learn_scale),
      max_scale=float(config.max_scale))
  model.eval()
  return model, tokenizer


def towers(model: nnx.Module) -> tuple[bert.BertModel, bert.BertModel]:
  """`(query encoder, document encoder)` of a dense model.

  A plain `BertModel` (the default: one shared tower, fixed scale) is both;
  a `biencoder.BiEncoder` has its own.
  """
  if isinstance(model, biencoder.BiEncoder):
    return model.query_encoder, model.document_encoder
  return model, model


def logit_scale(model: nnx.Module, config: ml_collections.ConfigDict) -> Any:
  """The similarity scale: the learned one of a `BiEncoder`, else fixed."""
  if isinstance(model, biencoder.BiEncoder):
    return model.scale()
  return config.scale


def trainable_filter(config: ml_collections.ConfigDict) -> Any:
  """The `nnx.split` filter of the trained parameters.

  `nnx.Param` for `method="full"`; the adapter parameters (`nnx.LoRAParam`)
  otherwise, plus ColBERT's projection, which has no pretrained value.
  """
  if config.method == "full":
    return nnx.Param
  if config.model == "colbert":
    return colbert.ADAPTERS_AND_PROJECTION
  if config.learn_scale:
    return nnx.Any(nnx.LoRAParam, biencoder.ScaleParam)
  return nnx.LoRAParam


def make_tokenize(
    config: ml_collections.ConfigDict,
    model: nnx.Module,
    tokenizer: bert.Tokenizer,
) -> Tokenize:
  """Tokenisation of a training batch of (queries, positive documents).

  Fixed shapes: queries padded to `config.query_max_length` tokens,
  documents to `config.doc_max_length` (ColBERT: its own markers and query
  `[MASK]` padding).
  """
  if config.model == "colbert":
    def tokenize_colbert(queries, docs):
      return (model.tokenize_queries(queries),
              model.tokenize_documents(docs, length=config.doc_max_length))
    return tokenize_colbert

  def tokenize(queries, docs):
    return (
        tokenizer(queries, max_length=config.query_max_length,
                  pad_to=config.query_max_length),
        tokenizer(docs, max_length=config.doc_max_length,
                  pad_to=config.doc_max_length),
    )
  return tokenize


def uses_step(config: ml_collections.ConfigDict) -> bool:
  """Whether the loss reads the training step (the SPLADE warm-up)."""
  return config.model == "splade"


# ----------------------------------------------------------------------------
# Losses.


def make_loss(
    config: ml_collections.ConfigDict,
    tokenizer: bert.Tokenizer,
    train_docs: Sequence[str] = (),
) -> Callable[..., tuple[jax.Array, dict[str, jax.Array]]]:
  """`loss(model, qs, ds, step) -> (loss, aux)` for `config.model`; jittable.

  `qs` / `ds` come from `make_tokenize`; row `i` of `ds` is query `i`'s
  positive, the other rows its in-batch negatives. `step` (the 1-based
  training step as a scalar array) is read by SPLADE only. `aux` holds
  extra scalars to log (SPLADE: the ranking loss, both regularisers, their
  weights and the mean number of non-zero terms per row).

  Args:
    config: The experiment config.
    tokenizer: The tokenizer (SPLADE's `idf_flops` computes token IDF).
    train_docs: Training documents (the IDF corpus of `idf_flops`).

  Returns:
    The loss function.
  """
  model_name = config.model
  if model_name == "biencoder":
    def biencoder_loss(m, qs, ds, step):
      del step
      q_enc, d_enc = towers(m)
      q = bert.encode(q_enc, qs, pooling=config.pooling, normalize=True)
      d = bert.encode(d_enc, ds, pooling=config.pooling, normalize=True)
      scale = logit_scale(m, config)
      loss = losses.in_batch_softmax(q, d, scale, symmetric=config.symmetric,
                                     same_side=config.same_side)
      aux = {"logit_scale": scale} if config.learn_scale else {}
      return loss, aux
    return biencoder_loss

  if model_name == "matryoshka":
    dims = _ints("matryoshka.dims", config.matryoshka.dims)
    weights = tuple(float(w) for w in config.matryoshka.weights) or None
    def matryoshka_loss(m, qs, ds, step):
      del step
      q_enc, d_enc = towers(m)
      q = bert.encode(q_enc, qs, pooling=config.pooling, normalize=False)
      d = bert.encode(d_enc, ds, pooling=config.pooling, normalize=False)
      scale = logit_scale(m, config)
      per_prefix = functools.partial(
          losses.in_batch_softmax, scale=scale, symmetric=config.symmetric,
          same_side=config.same_side)
      aux = {"logit_scale": scale} if config.learn_scale else {}
      return losses.matryoshka(per_prefix, q, d, dims, weights), aux
    return matryoshka_loss

  if model_name == "colbert":
    scale = float(config.colbert.scale)

    def colbert_loss(m, qs, ds, step):
      del step
      q, q_mask = m.encode_queries(qs)
      d, d_mask = m.encode_documents(ds)
      return colbert.in_batch_loss(q, q_mask, d, d_mask, scale=scale), {}
    return colbert_loss

  s = config.splade
  schedule = splade.RegWeightScheduler(
      lambda_q=float(s.lambda_q), lambda_d=float(s.lambda_d),
      warmup_steps_q=int(s.reg_warmup_steps),
      warmup_steps_d=int(s.reg_warmup_steps),
  )
  idf = None
  if s.regularizer == "idf_flops":
    docs = sorted(set(train_docs))
    if not docs:
      raise ValueError("splade.regularizer='idf_flops' needs training docs.")
    idf = splade.token_idf(tokenizer, docs, max_length=config.doc_max_length)

  def splade_loss(m, qs, ds, step):
    q_w = splade.encode(m, qs)
    d_w = splade.encode(m, ds)
    lambda_q, lambda_d = schedule(step)
    loss, aux = splade.splade_loss(
        q_w, d_w, lambda_q=lambda_q, lambda_d=lambda_d,
        regularizer=s.regularizer, idf=idf, scale=float(s.scale))
    return loss, dict(aux, lambda_q=lambda_q, lambda_d=lambda_d)
  return splade_loss


# ----------------------------------------------------------------------------
# Evaluation.


def _prefix(x: np.ndarray, m: int) -> np.ndarray:
  """The first `m` dims of each row, L2-renormalised."""
  p = np.asarray(x, np.float32)[:, :m]
  return p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)


def _timed(fn, *args, **kwargs):
  t = time.perf_counter()
  out = jax.block_until_ready(fn(*args, **kwargs))
  return out, time.perf_counter() - t


def _evaluate_dense(model, tokenizer, dataset, config, qids, dids):
  info: dict[str, Any] = {}
  t = time.perf_counter()
  q_enc, d_enc = towers(model)
  q = bert.embed_texts(
      q_enc, tokenizer, [dataset.queries[i] for i in qids],
      pooling=config.pooling, batch_size=config.eval_batch_size,
      max_length=config.query_max_length,
  )
  d = bert.embed_texts(
      d_enc, tokenizer, [dataset.corpus[i] for i in dids],
      pooling=config.pooling, batch_size=config.eval_batch_size,
      max_length=config.doc_max_length,
  )
  info["encode_s"] = time.perf_counter() - t
  k = min(config.eval_k, len(dids))
  t = time.perf_counter()
  run = search.search_run(qids, q, dids, d, k)
  info["search_s"] = time.perf_counter() - t
  out = metrics_lib.evaluate(dataset.qrels, run, EVAL_METRICS)
  full = q.shape[1]
  info["dim"] = int(full)
  for m in prefix_dims(config):
    if m == full:
      scores = {name: out[name] for name in PREFIX_METRICS}
    else:
      run_m = search.search_run(qids, _prefix(q, m), dids, _prefix(d, m), k)
      scores = metrics_lib.evaluate(dataset.qrels, run_m, PREFIX_METRICS)
    for name in PREFIX_METRICS:
      out[f"{name}@{m}"] = scores[name]
  return out, info


def _evaluate_colbert(model, dataset, config, qids, dids):
  info: dict[str, Any] = {}
  bs = config.eval_batch_size
  t = time.perf_counter()
  qv, qm = model.embed_queries([dataset.queries[i] for i in qids],
                               batch_size=bs)
  dv, dm = model.embed_documents([dataset.corpus[i] for i in dids],
                                 batch_size=bs)
  info["encode_s"] = time.perf_counter() - t
  info["doc_vectors"] = int(dm.sum())
  info["doc_vector_bytes"] = int(dm.sum()) * int(dv.shape[-1]) * 4
  k = min(config.eval_k, len(dids))
  rerank = min(max(int(config.colbert.muvera.rerank), k), len(dids))
  info["muvera_rerank"] = rerank

  (scores, idx), info["exact_search_s"] = _timed(
      colbert.search_exact, qv, qm, dv, dm, k)
  run = metrics_lib.run_from_scores(qids, dids, np.asarray(scores),
                                    np.asarray(idx))
  out = metrics_lib.evaluate(dataset.qrels, run, EVAL_METRICS)

  fde = fde_config(config)
  info["fde_dim"] = fde.output_dim
  doc_fdes, info["fde_index_s"] = _timed(colbert.encode_fdes, dv, dm, fde)
  info["fde_index_bytes"] = int(doc_fdes.size) * 4
  (scores, idx), info["muvera_search_s"] = _timed(
      colbert.search_muvera, qv, qm, dv, dm, k, fde, rerank,
      doc_fdes=doc_fdes)
  run_m = metrics_lib.run_from_scores(qids, dids, np.asarray(scores),
                                      np.asarray(idx))
  for name, value in metrics_lib.evaluate(
      dataset.qrels, run_m, EVAL_METRICS).items():
    out[f"muvera_{name}"] = value
  # The FDE ranking alone (no rerank), for reference: the candidate lists
  # (top `rerank`; the metrics read their top 10 / 100). Same call as inside
  # `search_muvera`, so it is compiled once.
  q_fdes = muvera.encode_queries(qv, jnp.asarray(qm) != 0, fde)
  scores, idx = search.exact_search(q_fdes, doc_fdes, rerank)
  run_f = metrics_lib.run_from_scores(qids, dids, np.asarray(scores),
                                      np.asarray(idx))
  for name, value in metrics_lib.evaluate(
      dataset.qrels, run_f, EVAL_METRICS).items():
    out[f"fde_{name}"] = value
  # How much of the exact top-k the MUVERA results recover.
  overlap = [len(set(run[q]) & set(run_m[q])) / max(len(run[q]), 1)
             for q in qids]
  info["muvera_overlap_with_exact"] = float(np.mean(overlap))
  return out, info


def _on_one_device(model: nnx.Module) -> tuple[nnx.Module, Any]:
  """`(copy, mesh)`: `model` replicated on this process's first device."""
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)],
                            devices=jax.local_devices()[:1])
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  graphdef, state = nnx.split(model)
  state = jax.tree.map(
      lambda x: jax.device_put(x, replicated) if isinstance(x, jax.Array)
      else x, state)
  return nnx.merge(graphdef, state), mesh


def _evaluate_splade(model, tokenizer, dataset, config, qids, dids):
  # `splade.embed_texts` does not shard its batches: on a mesh of several
  # devices every device would compute the whole batch (8 fake CPU devices:
  # 10x slower). One device does the work once.
  if len(jax.local_devices()) > 1:
    model, mesh = _on_one_device(model)
    with jax.set_mesh(mesh):
      return _evaluate_sparse(model, tokenizer, dataset, config, qids, dids)
  return _evaluate_sparse(model, tokenizer, dataset, config, qids, dids)


def _evaluate_sparse(model, tokenizer, dataset, config, qids, dids):
  info: dict[str, Any] = {}
  bs = config.eval_batch_size
  t = time.perf_counter()
  docs = splade.embed_texts(model, tokenizer,
                            [dataset.corpus[i] for i in dids],
                            batch_size=bs, max_length=config.doc_max_length)
  index = sparse_index.build(docs)
  info["index_s"] = time.perf_counter() - t
  t = time.perf_counter()
  queries = splade.embed_texts(model, tokenizer,
                               [dataset.queries[i] for i in qids],
                               batch_size=bs,
                               max_length=config.query_max_length)
  info["encode_queries_s"] = time.perf_counter() - t
  t = time.perf_counter()
  k = min(config.eval_k, len(dids))
  run = sparse_index.search_run(index, qids, queries, dids, k)
  info["search_s"] = time.perf_counter() - t
  info.update(
      avg_query_terms=queries.nnz / queries.num_rows,
      avg_doc_terms=docs.nnz / docs.num_rows,
      expected_flops=splade.expected_flops(queries, docs),
      postings=index.nnz,
  )
  return metrics_lib.evaluate(dataset.qrels, run, EVAL_METRICS), info


def evaluate(
    model: nnx.Module,
    tokenizer: bert.Tokenizer,
    dataset: Any,
    config: ml_collections.ConfigDict,
) -> tuple[dict[str, float], dict[str, Any]]:
  """Encodes the test queries and corpus, searches, trec_eval metrics.

  Args:
    model: The model of `config.model` (as `load_model`, possibly trained).
    tokenizer: Its tokenizer.
    dataset: A `lowrank.data.beir.Dataset`-like object (`corpus`,
      `queries`, `qrels`); every judged query is searched.
    config: The experiment config (lengths, batch size, `eval_k`, model
      options).

  Returns:
    `(metrics, info)`; see the module docstring.

  Raises:
    ValueError: If the dataset has no judged query or no document.
  """
  qids = sorted(dataset.qrels)
  dids = sorted(dataset.corpus)
  if not qids or not dids:
    raise ValueError(
        f"Evaluation needs at least one judged query and one document; got "
        f"{len(qids)} queries and {len(dids)} documents."
    )
  model.eval()
  if config.model in DENSE_MODELS:
    return _evaluate_dense(model, tokenizer, dataset, config, qids, dids)
  if config.model == "colbert":
    return _evaluate_colbert(model, dataset, config, qids, dids)
  return _evaluate_splade(model, tokenizer, dataset, config, qids, dids)


# ----------------------------------------------------------------------------
# Reporting.


def prefix_curve(
    metrics: Mapping[str, float], measure: str = "ndcg_cut_10"
) -> dict[int, float]:
  """`{prefix size: value}` of `measure` from `"measure@dim"` keys."""
  out = {}
  for key, value in metrics.items():
    name, sep, dim = key.partition("@")
    if sep and name == measure:
      out[int(dim)] = float(value)
  return dict(sorted(out.items()))


def _fmt_s(x: Any) -> str:
  return "-" if x is None else f"{x:.1f} s"


def format_extra(r: Mapping[str, Any]) -> str:
  """Model-specific Markdown tables of one run's results ("" if none)."""
  z, f = r["zero_shot"], r["final"]
  zi, fi = r.get("zero_shot_info") or {}, r.get("final_info") or {}
  model = r.get("model", "biencoder")
  rows = []
  if prefix_curve(f):
    rows += [
        f"{model}: nDCG@10 / Recall@100 by embedding prefix size "
        "(truncate + renormalise)",
        "",
        "| dims | zero-shot nDCG@10 | final nDCG@10 | zero-shot Recall@100 |"
        " final Recall@100 |",
        "|---:|---:|---:|---:|---:|",
    ]
    for m in sorted(prefix_curve(f), reverse=True):
      zn, zr = z.get(f"ndcg_cut_10@{m}"), z.get(f"recall_100@{m}")
      zn = "-" if zn is None else f"{zn:.4f}"
      zr = "-" if zr is None else f"{zr:.4f}"
      rows.append(f"| {m} | {zn} | {f[f'ndcg_cut_10@{m}']:.4f} | {zr} | "
                  f"{f[f'recall_100@{m}']:.4f} |")
  elif model == "colbert":
    rows += [
        f"colbert: exact MaxSim vs MUVERA (FDE {fi.get('fde_dim')}-d, top "
        f"{fi.get('muvera_rerank')} reranked by MaxSim); search times of the "
        "final evaluation (zero-shot's in brackets, compilation included)",
        "",
        "| search | zero-shot nDCG@10 | final nDCG@10 | zero-shot "
        "Recall@100 | final Recall@100 | search time |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, prefix, t_key in (
        ("exact MaxSim", "", "exact_search_s"),
        ("MUVERA FDE + MaxSim rerank", "muvera_", "muvera_search_s"),
        ("MUVERA FDE only", "fde_", None)):
      t = "-" if t_key is None else (
          f"{_fmt_s(fi.get(t_key))} ({_fmt_s(zi.get(t_key))})")
      rows.append(
          f"| {label} | {z[prefix + 'ndcg_cut_10']:.4f} | "
          f"{f[prefix + 'ndcg_cut_10']:.4f} | {z[prefix + 'recall_100']:.4f}"
          f" | {f[prefix + 'recall_100']:.4f} | {t} |")
    rows += [
        "",
        f"FDE index build {_fmt_s(fi.get('fde_index_s'))} "
        f"({fi.get('fde_index_bytes', 0) / 2**20:.0f} MiB vs "
        f"{fi.get('doc_vector_bytes', 0) / 2**20:.0f} MiB of token "
        f"vectors); MUVERA top-k overlap with exact: "
        f"{fi.get('muvera_overlap_with_exact', float('nan')):.3f}.",
    ]
  elif model == "splade":
    rows += [
        "splade: inverted-index retrieval",
        "",
        "| | nDCG@10 | Recall@100 | avg query terms | avg doc terms |"
        " expected FLOPS | search time |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, m, info in (("zero-shot", z, zi), ("final", f, fi)):
      if not info:
        continue
      rows.append(
          f"| {label} | {m['ndcg_cut_10']:.4f} | {m['recall_100']:.4f} | "
          f"{info['avg_query_terms']:.1f} | {info['avg_doc_terms']:.1f} | "
          f"{info['expected_flops']:.1f} | {_fmt_s(info['search_s'])} |")
  return "\n".join(rows)


def plot_prefix_curves(
    runs: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    labels: Sequence[str] | None = None,
    zero_shot: bool = True,
) -> str:
  """Plots nDCG@10 and Recall@100 against embedding prefix size.

  One line per run (its final metrics), plus the first run's zero-shot
  curve. Runs without prefix metrics are skipped.

  Args:
    runs: Result dicts of `finetune_retriever.train_and_evaluate`.
    path: Output PNG.
    labels: One label per run (default: `model method (N steps)`).
    zero_shot: Also plot the first run's zero-shot curve.

  Returns:
    `path` as a string.

  Raises:
    ValueError: If no run has prefix metrics.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  runs = [r for r in runs if prefix_curve(r["final"])]
  if not runs:
    raise ValueError("No run has prefix metrics (ndcg_cut_10@<dim> keys).")
  if labels is None:
    labels = [f"{r.get('model', 'biencoder')} {r['method']} "
              f"({r['num_train_steps']} steps)" for r in runs]
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for ax, measure, name in zip(axes, PREFIX_METRICS,
                               ("nDCG@10", "Recall@100")):
    if zero_shot:
      c = prefix_curve(runs[0]["zero_shot"], measure)
      ax.plot(list(c), list(c.values()), "k--", marker="o",
              label="zero-shot (truncated)")
    for r, label in zip(runs, labels):
      c = prefix_curve(r["final"], measure)
      ax.plot(list(c), list(c.values()), marker="o", label=label)
    ax.set_xscale("log", base=2)
    dims = sorted({m for r in runs for m in prefix_curve(r["final"])})
    ax.set_xticks(dims, [str(m) for m in dims])
    ax.set(xlabel="embedding prefix size", ylabel=f"{name} (test)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f"Matryoshka curve on {runs[0]['data']}")
  fig.tight_layout()
  path = os.fspath(path)
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)
  return path
