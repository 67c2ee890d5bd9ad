"""tensorflow-datasets builders for the retrieval data, without TensorFlow.

Three builders write `array_record` files and are read back with
`builder.as_data_source()` (random access through `array_record`); neither
step imports TensorFlow (https://www.tensorflow.org/datasets/tfless_tfds):

- `BeirDirectory` (`"beir"`): any BEIR-format directory passed as the manual
  dir (https://github.com/beir-cellar/beir, Thakur et al. 2021,
  https://arxiv.org/abs/2104.08663). Configs `corpus` (split `corpus`:
  `_id`, `title`, `text` as in the file), `queries` (one split per
  `qrels/<split>.tsv`: the queries judged there, in order of first
  judgment) and `qrels` (the same splits: `query_id`, `corpus_id`, `score`).
  Lines are validated by `lowrank.data.beir.read_directory`; a problem line
  raises, or with `on_error="count"` is skipped and listed in
  `info.metadata["problems"]`.
- `CodeSearch` (`"code_search"`): `lowrank.data.code_search`'s docstring ->
  code task over the running Python's stdlib, configs `corpus`, `queries`,
  `qrels`, each with splits `train` and `test`.
- `LeeCorpus` (`"lee"`): the Lee, Pincombe & Welsh (2005) news corpus as
  shipped in gensim's test data (50 documents, 300 background documents and
  the 50 x 50 matrix of averaged human similarity ratings,
  http://www.cogsci.ucsd.edu/~welsh/papers/cogsci05lee.pdf). Configs
  `documents` (splits `test`, the 50 rated documents, and `background`) and
  `similarity` (split `test`: the 1225 pairs `i < j` with their rating).
  gensim is never imported: the files are found through
  `importlib.util.find_spec("gensim")`.

Each builder records a fingerprint of its source (file hashes, or the Python
version for `code_search`) in `info.metadata`. `load`, `builder` and
`data_sources` prepare on first use and refuse to reuse prepared files whose
fingerprint differs (pass another `data_dir` or `overwrite=True`), so a
`data_dir` shared by two BEIR directories never serves the wrong one. `load`
puts each BEIR directory under `<data_dir>/<directory name>` by default.

Example:

  dataset = tfds_builders.load("beir", data_dir="/tmp/tfds",
                               manual_dir="../shared/data/beir/scifact")
  sources = tfds_builders.data_sources("lee", "similarity", data_dir=...)
  sources["test"][0]  # {"doc_a": b"0", "doc_b": b"1", "score": 0.3}
"""

from collections.abc import Iterator, Mapping
import dataclasses
import hashlib
import importlib.util
import inspect
import os
import pathlib
import sys
from typing import Any, Literal

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from lowrank.data import beir
from lowrank.data import code_search

_FILE_FORMAT = "array_record"
_VERSION = tfds.core.Version("1.0.0")
_TEXT = tfds.features.Text
_FINGERPRINT = "source_fingerprint"


def _int_scalar() -> tfds.features.Tensor:
  return tfds.features.Tensor(shape=(), dtype=np.int32)


def _float_scalar() -> tfds.features.Tensor:
  return tfds.features.Tensor(shape=(), dtype=np.float32)


def _sha256_files(paths: list[pathlib.Path]) -> str:
  digest = hashlib.sha256()
  for path in paths:
    digest.update(path.name.encode("utf-8") + b"\0")
    with path.open("rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
  return digest.hexdigest()


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared parts: metadata, fingerprint, examples in generation order."""

  VERSION = _VERSION
  DESCRIPTION = ""
  # Config name -> feature name -> feature factory (fresh per builder).
  FEATURES: Mapping[str, Mapping[str, Any]] = {}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds' own lookup reaches `importlib_resources` (a backport it only
    # declares for Python < 3.9) for classes inside packages; skip it.
    return epath.Path(inspect.getfile(cls))

  def source_fingerprint(self, manual_dir: pathlib.Path | None) -> str:
    """A string that changes when the source data changes."""
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({
            key: make()
            for key, make in self.FEATURES[self.builder_config.name].items()
        }),
        metadata=tfds.core.MetadataDict(),
        # Keep file order (corpus order decides search tie-breaks).
        disable_shuffling=True,
    )

  def _set_fingerprint(self, manual_dir: pathlib.Path | None) -> None:
    self.info.metadata[_FINGERPRINT] = self.source_fingerprint(manual_dir)


def _keyed(rows: Iterator[dict[str, Any]]) -> Iterator[tuple[int, dict]]:
  yield from enumerate(rows)


# ----------------------------------------------------------------------------
# BEIR directories.


class BeirDirectory(_Builder, skip_registration=True):
  """Any BEIR-format directory, given as the manual dir."""

  name = "beir_directory"
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="corpus", description="corpus.jsonl"),
      tfds.core.BuilderConfig(
          name="queries", description="Judged queries, per qrels split."
      ),
      tfds.core.BuilderConfig(
          name="qrels", description="qrels/<split>.tsv, one split each."
      ),
  ]
  DESCRIPTION = "A BEIR-format directory (corpus, queries, qrels/*.tsv)."
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Pass a BEIR-format directory (corpus.jsonl, queries.jsonl, "
      "qrels/<split>.tsv) as manual_dir."
  )
  FEATURES = {
      "corpus": {"_id": _TEXT, "title": _TEXT, "text": _TEXT},
      "queries": {"_id": _TEXT, "text": _TEXT},
      "qrels": {
          "query_id": _TEXT,
          "corpus_id": _TEXT,
          "score": _int_scalar,
      },
  }

  def __init__(
      self,
      *,
      on_error: Literal["raise", "count"] = "raise",
      keep_empty_documents: bool = False,
      **kwargs,
  ):
    """Builder; `on_error` and `keep_empty_documents` as in `beir.load_beir`.

    Args:
      on_error: `"raise"` or `"count"` (problems go to
        `info.metadata["problems"]`).
      keep_empty_documents: Keep documents with an empty title and text.
      **kwargs: `tfds.core.GeneratorBasedBuilder` arguments (`config`,
        `data_dir`, `file_format`, ...).
    """
    self._on_error = on_error
    self._keep_empty_documents = keep_empty_documents
    super().__init__(**kwargs)

  def source_fingerprint(self, manual_dir: pathlib.Path | None) -> str:
    root = _beir_root(manual_dir)
    files = [root / "corpus.jsonl", root / "queries.jsonl"]
    files += [root / "qrels" / f"{s}.tsv" for s in beir.available_splits(root)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
      raise FileNotFoundError(f"Missing BEIR file(s): {missing}")
    options = (
        f"on_error={self._on_error},"
        f"keep_empty_documents={self._keep_empty_documents}"
    )
    return f"{options}:{_sha256_files(files)}"

  def _split_generators(self, dl_manager):
    root = _beir_root(dl_manager.manual_dir)
    raw = beir.read_directory(
        root,
        on_error=self._on_error,
        keep_empty_documents=self._keep_empty_documents,
    )
    self._set_fingerprint(root)
    self.info.metadata["source_dir"] = str(root.resolve())
    self.info.metadata["problems"] = list(raw.problems)
    kind = self.builder_config.name
    if kind == "corpus":
      return {
          "corpus": _keyed(
              {"_id": did, "title": title, "text": text}
              for did, (title, text) in raw.documents.items()
          )
      }
    if kind == "queries":
      return {
          split: _keyed(
              {"_id": qid, "text": raw.queries[qid]} for qid in qrels
          )
          for split, qrels in raw.qrels.items()
      }
    return {
        split: _keyed(
            {"query_id": qid, "corpus_id": did, "score": rel}
            for qid, judged in qrels.items()
            for did, rel in judged.items()
        )
        for split, qrels in raw.qrels.items()
    }

  def _generate_examples(self, **unused_kwargs):
    raise NotImplementedError("Splits come from _split_generators.")


def _beir_root(manual_dir) -> pathlib.Path:
  if manual_dir is None:
    raise ValueError(
        "The BEIR builder needs manual_dir=<a BEIR-format directory>."
    )
  root = pathlib.Path(os.fspath(manual_dir))
  if not root.is_dir():
    raise FileNotFoundError(f"{root}: no such BEIR directory")
  return root


# ----------------------------------------------------------------------------
# Stdlib code search.


class CodeSearch(_Builder, skip_registration=True):
  """`lowrank.data.code_search` with its default options."""

  name = "code_search"
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="corpus", description="Function code."),
      tfds.core.BuilderConfig(name="queries", description="Summaries."),
      tfds.core.BuilderConfig(name="qrels", description="One per query."),
  ]
  DESCRIPTION = "Python stdlib docstring summary -> function code retrieval."
  FEATURES = {
      "corpus": {"_id": _TEXT, "text": _TEXT},
      "queries": {"_id": _TEXT, "text": _TEXT},
      "qrels": {
          "query_id": _TEXT,
          "corpus_id": _TEXT,
          "score": _int_scalar,
      },
  }

  def source_fingerprint(self, manual_dir: pathlib.Path | None) -> str:
    del manual_dir  # Unused.
    # The task depends on the stdlib (the Python version) and on the rules in
    # code_search.py.
    rules = _sha256_files([pathlib.Path(inspect.getfile(code_search))])
    return f"python {sys.version.split()[0]}:{rules}"

  def _split_generators(self, dl_manager):
    self._set_fingerprint(None)
    kind = self.builder_config.name
    out = {}
    for split in ("train", "test"):
      dataset = code_search.load_code_search(split)
      if kind == "corpus":
        rows = ({"_id": k, "text": v} for k, v in dataset.corpus.items())
      elif kind == "queries":
        rows = ({"_id": k, "text": v} for k, v in dataset.queries.items())
      else:
        rows = (
            {"query_id": qid, "corpus_id": did, "score": rel}
            for qid, judged in dataset.qrels.items()
            for did, rel in judged.items()
        )
      out[split] = _keyed(rows)
    return out

  def _generate_examples(self, **unused_kwargs):
    raise NotImplementedError("Splits come from _split_generators.")


# ----------------------------------------------------------------------------
# gensim's Lee corpus.

LEE_FILES = ("lee.cor", "lee_background.cor", "similarities0-1.txt")
LEE_BACKGROUND_PREFIX = "bg"


def gensim_test_data_dir() -> pathlib.Path:
  """gensim's `test/test_data` folder, located without importing gensim.

  Returns:
    The folder.

  Raises:
    FileNotFoundError: If gensim is not installed (the Makefile installs its
      wheel with `--no-deps`) or the folder lacks the Lee files.
  """
  spec = importlib.util.find_spec("gensim")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "gensim is not installed; `pip install --no-deps gensim==4.4.0` "
        "provides the Lee corpus (see the Makefile's assets)."
    )
  folder = pathlib.Path(spec.submodule_search_locations[0], "test", "test_data")
  missing = [f for f in LEE_FILES if not (folder / f).is_file()]
  if missing:
    raise FileNotFoundError(f"{folder}: missing {missing}")
  return folder


def _read_lee_lines(path: pathlib.Path) -> list[str]:
  """Lines of a Lee `.cor` file (Latin-1, like gensim's own test reads it)."""
  lines = path.read_bytes().decode("latin-1").splitlines()
  for lineno, line in enumerate(lines, start=1):
    if not line.strip():
      raise ValueError(f"{path}:{lineno}: empty document line")
  if not lines:
    raise ValueError(f"{path}: no documents")
  return [line.strip() for line in lines]


def read_lee_similarity(path: pathlib.Path, n: int) -> np.ndarray:
  """Reads the `n x n` human-rating matrix (upper triangle, unit diagonal).

  Args:
    path: `similarities0-1.txt` (tab-separated floats, one row per line).
    n: The number of rated documents.

  Returns:
    float32 `[n, n]` symmetric matrix with ones on the diagonal.

  Raises:
    ValueError: Naming the file and line, if a row has the wrong number of
      fields, a non-number, a value outside `[0, 1]`, a nonzero entry below
      the diagonal or a diagonal entry other than 1; or if there are not
      exactly `n` rows.
  """
  rows = []
  for lineno, line in enumerate(path.read_text("ascii").splitlines(), 1):
    if not line.strip():
      continue
    fields = line.split()
    if len(fields) != n:
      raise ValueError(
          f"{path}:{lineno}: expected {n} values, got {len(fields)}"
      )
    try:
      values = [float(f) for f in fields]
    except ValueError as e:
      raise ValueError(f"{path}:{lineno}: {e}") from None
    i = len(rows)
    for j, v in enumerate(values):
      if not 0.0 <= v <= 1.0:
        raise ValueError(f"{path}:{lineno}: column {j + 1}: {v} not in [0, 1]")
      if j < i and v != 0.0:
        raise ValueError(
            f"{path}:{lineno}: column {j + 1}: expected 0 below the diagonal "
            f"(the matrix is upper-triangular), got {v}"
        )
      if j == i and v != 1.0:
        raise ValueError(f"{path}:{lineno}: diagonal entry is {v}, not 1")
    rows.append(values)
  if len(rows) != n:
    raise ValueError(f"{path}: expected {n} rows, got {len(rows)}")
  upper = np.asarray(rows, np.float32)
  return upper + np.triu(upper, 1).T


class LeeCorpus(_Builder, skip_registration=True):
  """gensim's copy of the Lee et al. (2005) corpus and human ratings."""

  name = "lee"
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(
          name="documents",
          description="Splits test (50 rated) and background (300).",
      ),
      tfds.core.BuilderConfig(
          name="similarity", description="Human rating of each pair i < j."
      ),
  ]
  DESCRIPTION = (
      "Lee, Pincombe & Welsh (2005): 50 news documents with averaged human "
      "similarity ratings in [0, 1], plus 300 background documents."
  )
  FEATURES = {
      "documents": {"_id": _TEXT, "text": _TEXT},
      "similarity": {
          "doc_a": _TEXT,
          "doc_b": _TEXT,
          "score": _float_scalar,
      },
  }

  def source_fingerprint(self, manual_dir: pathlib.Path | None) -> str:
    del manual_dir  # Unused.
    folder = gensim_test_data_dir()
    return _sha256_files([folder / f for f in LEE_FILES])

  def _split_generators(self, dl_manager):
    folder = gensim_test_data_dir()
    self._set_fingerprint(None)
    docs = _read_lee_lines(folder / LEE_FILES[0])
    if self.builder_config.name == "documents":
      background = _read_lee_lines(folder / LEE_FILES[1])
      return {
          "test": _keyed(
              {"_id": str(i), "text": t} for i, t in enumerate(docs)
          ),
          "background": _keyed(
              {"_id": f"{LEE_BACKGROUND_PREFIX}{i}", "text": t}
              for i, t in enumerate(background)
          ),
      }
    sim = read_lee_similarity(folder / LEE_FILES[2], len(docs))
    a, b = np.triu_indices(len(docs), 1)
    return {
        "test": _keyed(
            {"doc_a": str(i), "doc_b": str(j), "score": sim[i, j]}
            for i, j in zip(a.tolist(), b.tolist())
        )
    }

  def _generate_examples(self, **unused_kwargs):
    raise NotImplementedError("Splits come from _split_generators.")


# ----------------------------------------------------------------------------
# Function API.

BUILDERS: dict[str, type[_Builder]] = {
    "beir": BeirDirectory,
    "code_search": CodeSearch,
    "lee": LeeCorpus,
}


@dataclasses.dataclass(frozen=True)
class LeeDataset:
  """The Lee corpus as loaded by `load("lee")`.

  Attributes:
    documents: Id (`"0"`..`"49"`) -> text of the rated documents.
    background: Id (`"bg0"`..) -> text of the background documents.
    similarity: float32 `[50, 50]` symmetric human ratings, in the order of
      `documents`, ones on the diagonal.
  """

  documents: dict[str, str]
  background: dict[str, str]
  similarity: np.ndarray


def _check_name(name: str) -> type[_Builder]:
  if name not in BUILDERS:
    raise ValueError(
        f"Unknown dataset {name!r}; expected one of {list(BUILDERS)}"
    )
  return BUILDERS[name]


def builder(
    name: str,
    config: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    manual_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    **builder_kwargs,
) -> _Builder:
  """Returns the prepared builder for `name`/`config` (prepares if needed).

  Args:
    name: `"beir"`, `"code_search"` or `"lee"`.
    config: A config of that builder (e.g. `"corpus"`).
    data_dir: Where the array_record files go (tfds' default if None).
    manual_dir: The source directory (`"beir"` only; may be omitted to read
      files already prepared in `data_dir`, unchecked).
    overwrite: Regenerate even if prepared files exist.
    **builder_kwargs: Builder options (`on_error`, `keep_empty_documents` for
      `"beir"`).

  Returns:
    The builder, with `download_and_prepare` done.

  Raises:
    ValueError: For an unknown name or config, or if `data_dir` holds files
      prepared from a different source (other files, options or Python) and
      `overwrite` is False.
  """
  cls = _check_name(name)
  configs = [c.name for c in cls.BUILDER_CONFIGS]
  if config not in configs:
    raise ValueError(
        f"Unknown config {config!r} for {name!r}; expected {configs}"
    )
  if name != "beir" and manual_dir is not None:
    raise ValueError(f"{name!r} takes no manual_dir; got {manual_dir!r}")
  b = cls(
      config=config,
      data_dir=None if data_dir is None else os.fspath(data_dir),
      file_format=_FILE_FORMAT,
      **builder_kwargs,
  )
  manual = None if manual_dir is None else pathlib.Path(os.fspath(manual_dir))
  mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  if name == "beir" and manual is None:
    if not b.is_prepared():
      raise ValueError(
          f"{b.data_dir} is not prepared; the BEIR builder needs "
          "manual_dir=<a BEIR-format directory>."
      )
    if overwrite:
      raise ValueError("overwrite=True needs manual_dir for 'beir'.")
    # Serve what was prepared; there is no source to compare with.
    logging.info(
        "Reading %s (prepared from %s) without checking its source",
        b.data_dir,
        (b.info.metadata or {}).get("source_dir"),
    )
  elif b.is_prepared():
    stored = (b.info.metadata or {}).get(_FINGERPRINT)
    current = b.source_fingerprint(manual)
    if overwrite:
      mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
    elif stored != current:
      raise ValueError(
          f"{b.data_dir} was prepared from another source (fingerprint "
          f"{str(stored)[:40]!r}, now {current[:40]!r}; source dir "
          f"{(b.info.metadata or {}).get('source_dir')}); pass another "
          "data_dir or overwrite=True."
      )
  b.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          manual_dir=None if manual is None else os.fspath(manual),
          download_mode=mode,
      )
  )
  return b


def data_sources(name: str, config: str, **kwargs) -> dict[str, Any]:
  """`builder(name, config, **kwargs).as_data_source()`: split -> source.

  Each source supports `len()` and integer indexing; text features come back
  as UTF-8 `bytes`, numbers as numpy scalars.
  """
  return dict(builder(name, config, **kwargs).as_data_source())


def _text(value: bytes | str) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else value


def _records(source) -> Iterator[dict[str, Any]]:
  for i in range(len(source)):
    yield source[i]


def _id_to_text(source) -> dict[str, str]:
  return {_text(r["_id"]): _text(r["text"]) for r in _records(source)}


def load(
    name: str,
    split: str = "test",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    manual_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    **builder_kwargs,
) -> beir.Dataset | LeeDataset:
  """Prepares (once) and reads back a dataset through its tfds builder.

  Args:
    name: `"beir"` (needs `manual_dir`), `"code_search"` or `"lee"`.
    split: A qrels split for `"beir"` (e.g. `"test"`), `"train"`/`"test"`
      for `"code_search"`; ignored for `"lee"`.
    data_dir: Where the array_record files go. For `"beir"` the files go
      under `<data_dir>/<manual dir's name>` so that collections do not share
      a folder. tfds' default when None.
    manual_dir: The BEIR-format directory.
    overwrite: Regenerate even if prepared files exist.
    **builder_kwargs: `on_error`, `keep_empty_documents` for `"beir"`.

  Returns:
    For `"beir"`, the same `beir.Dataset` as `beir.load_beir(manual_dir,
    split)` (`problems` come from the builder's metadata); for
    `"code_search"`, the same as `code_search.load_code_search(split)`; for
    `"lee"`, a `LeeDataset`.

  Raises:
    ValueError: See `builder`; also for a split the data does not have.
  """
  kw = dict(overwrite=overwrite, **builder_kwargs)
  if name == "lee":
    docs = data_sources("lee", "documents", data_dir=data_dir, **kw)
    sims = data_sources("lee", "similarity", data_dir=data_dir, **kw)["test"]
    documents = _id_to_text(docs["test"])
    background = _id_to_text(docs["background"])
    index = {doc_id: i for i, doc_id in enumerate(documents)}
    matrix = np.eye(len(documents), dtype=np.float32)
    for r in _records(sims):
      i, j = index[_text(r["doc_a"])], index[_text(r["doc_b"])]
      matrix[i, j] = matrix[j, i] = r["score"]
    return LeeDataset(documents, background, matrix)

  _check_name(name)
  if name == "beir":
    if manual_dir is None:
      raise ValueError("load('beir') needs manual_dir=<a BEIR directory>.")
    if data_dir is not None:
      data_dir = pathlib.Path(os.fspath(data_dir)) / pathlib.Path(
          os.fspath(manual_dir)
      ).resolve().name
    kw["manual_dir"] = manual_dir
  elif split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
  parts = {}
  problems: list[str] = []
  for config in ("corpus", "queries", "qrels"):
    b = builder(name, config, data_dir=data_dir, **kw)
    sources = dict(b.as_data_source())
    want = "corpus" if name == "beir" and config == "corpus" else split
    if want not in sources:
      raise ValueError(
          f"No split {split!r} in {name!r} {config}; available: "
          f"{sorted(sources)}"
      )
    parts[config] = sources[want]
    if config == "corpus":
      problems = list((b.info.metadata or {}).get("problems", []))
  if name == "beir":
    corpus = {
        _text(r["_id"]): beir.join_title(_text(r["title"]), _text(r["text"]))
        for r in _records(parts["corpus"])
    }
  else:
    corpus = _id_to_text(parts["corpus"])
  queries = _id_to_text(parts["queries"])
  qrels: dict[str, dict[str, int]] = {}
  for r in _records(parts["qrels"]):
    qrels.setdefault(_text(r["query_id"]), {})[_text(r["corpus_id"])] = int(
        r["score"]
    )
  if name == "beir":
    dataset_name = pathlib.Path(os.fspath(manual_dir)).resolve().name
  else:
    dataset_name = "code_search"
  train_pairs = []
  if name == "code_search" and split == "train":
    train_pairs = [
        (queries[qid], corpus[did]) for qid, judged in qrels.items()
        for did in judged
    ]
  logging.info(
      "tfds_builders.load(%r, %r): %d documents, %d queries, %d judgments",
      name,
      split,
      len(corpus),
      len(queries),
      sum(len(v) for v in qrels.values()),
  )
  return beir.Dataset(
      corpus=corpus,
      queries=queries,
      qrels=qrels,
      name=dataset_name,
      problems=problems,
      train_pairs=train_pairs,
  )
