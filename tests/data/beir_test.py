"""Tests for `lowrank.data.beir`."""

import pathlib
import re

from absl.testing import absltest
from absl.testing import parameterized
import pytest

from lowrank.data import beir

from tests import testing

_CORPUS = [
    '{"_id": "d1", "title": "Title one", "text": "text one"}',
    '{"_id": "d2", "text": "text two", "metadata": {}}',
]
_QUERIES = [
    '{"_id": "q1", "text": "query one"}',
    '{"_id": "q2", "text": "query two"}',
    '{"_id": "q3", "text": "not judged in this split"}',
]
_QRELS = ["query-id\tcorpus-id\tscore", "q1\td1\t1", "q2\td2\t0"]


@pytest.mark.shared_data
class LoadBeirSharedDataTest(parameterized.TestCase):
  """Loads the real collections in ../shared/data/beir (skipped if absent)."""

  @parameterized.named_parameters(
      # name, split, judged queries, documents, judgments
      ("scifact_test", "scifact", "test", 300, 5183, 339),
      ("scifact_train", "scifact", "train", 809, 5183, 919),
      ("adi", "adi", "test", 35, 82, 170),
      ("cisi", "cisi", "test", 76, 1460, 3114),
  )
  def test_official_counts(self, name, split, num_queries, num_docs, num_qrels):
    dataset = beir.load_beir(testing.beir_dir(self, name), split)
    self.assertLen(dataset.queries, num_queries)
    self.assertLen(dataset.corpus, num_docs)
    self.assertEqual(sum(len(v) for v in dataset.qrels.values()), num_qrels)
    self.assertEqual(dataset.name, name)
    self.assertEmpty(dataset.problems)
    self.assertEqual(set(dataset.queries), set(dataset.qrels))
    for judged in dataset.qrels.values():
      self.assertContainsSubset(set(judged), set(dataset.corpus))

  def test_scifact_title_and_text_are_joined(self):
    dataset = beir.load_beir(testing.beir_dir(self, "scifact"))
    self.assertStartsWith(
        dataset.corpus["4983"],
        "Microstructural development of human newborn cerebral white matter "
        "assessed in vivo by diffusion tensor magnetic resonance imaging. "
        "Alterations of the architecture",
    )
    self.assertEqual(dataset.qrels["1"], {"31715818": 1})

  def test_every_collection_and_split_loads(self):
    root = testing.beir_dir(self)
    # The policy for real quirks: only Cranfield's two empty documents need
    # an option; everything else loads with the strict default.
    for directory in sorted(p for p in root.iterdir() if p.is_dir()):
      with self.subTest(directory.name):
        keep = directory.name == "cranfield"
        raw = beir.read_directory(directory, keep_empty_documents=keep)
        self.assertEmpty(raw.problems)
        self.assertEqual(sorted(raw.qrels), beir.available_splits(directory))
        for split in raw.qrels:
          dataset = beir.load_beir(
              directory, split, keep_empty_documents=keep
          )
          self.assertEqual(dataset.qrels, raw.qrels[split])

  def test_cranfield_empty_documents(self):
    directory = testing.beir_dir(self, "cranfield")
    # Documents 471 and 995 are empty in the original collection.
    with self.assertRaisesRegex(ValueError, r"corpus\.jsonl:471: .*empty"):
      beir.load_beir(directory)
    kept = beir.load_beir(directory, keep_empty_documents=True)
    self.assertLen(kept.corpus, 1400)
    self.assertEqual(kept.corpus["995"], "")
    self.assertEqual(sum(len(v) for v in kept.qrels.values()), 1837)
    counted = beir.load_beir(directory, on_error="count")
    self.assertLen(counted.corpus, 1398)
    self.assertLen(counted.problems, 3)  # 2 documents, then a judgment of 995.
    self.assertIn(
        "test.tsv:990: unknown document id '995'", counted.problems[2]
    )


class LoadBeirValidationTest(parameterized.TestCase):

  def _write(self, corpus=None, queries=None, qrels=None, split="test"):
    root = pathlib.Path(self.create_tempdir().full_path)
    (root / "qrels").mkdir()
    files = {
        "corpus.jsonl": _CORPUS if corpus is None else corpus,
        "queries.jsonl": _QUERIES if queries is None else queries,
        f"qrels/{split}.tsv": _QRELS if qrels is None else qrels,
    }
    for name, lines in files.items():
      (root / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root

  def test_valid(self):
    dataset = beir.load_beir(self._write())
    self.assertEqual(
        dataset.corpus, {"d1": "Title one text one", "d2": "text two"}
    )
    # q3 exists in queries.jsonl but is not judged in this split.
    self.assertEqual(dataset.queries, {"q1": "query one", "q2": "query two"})
    self.assertEqual(dataset.qrels, {"q1": {"d1": 1}, "q2": {"d2": 0}})
    self.assertEmpty(dataset.problems)

  def test_blank_lines_crlf_and_headerless_qrels(self):
    corpus = [_CORPUS[0] + "\r", "", "   ", _CORPUS[1] + "\r"]
    dataset = beir.load_beir(self._write(corpus=corpus, qrels=_QRELS[1:]))
    self.assertEqual(list(dataset.corpus), ["d1", "d2"])
    self.assertEqual(dataset.qrels, {"q1": {"d1": 1}, "q2": {"d2": 0}})

  @parameterized.named_parameters(
      # name, file, lines to append, line number of the problem, message.
      ("bad_json", "corpus", ['{"_id": "d3", "text": '], 3, "malformed JSON"),
      ("not_object", "corpus", ["[1, 2]"], 3, "expected a JSON object"),
      ("missing_id", "corpus", ['{"text": "t"}'],
       3, "missing or invalid '_id'"),
      ("missing_text", "corpus", ['{"_id": "d3"}'], 3, "'text'"),
      ("bad_title", "corpus", ['{"_id": "d3", "title": 7, "text": "t"}'],
       3, "non-string 'title'"),
      ("duplicate_doc", "corpus", ['{"_id": "d1", "text": "t"}'],
       3, "duplicate document id 'd1' (first on line 1)"),
      ("empty_doc", "corpus", ['{"_id": "d3", "title": "", "text": " "}'],
       3, "empty text"),
      ("duplicate_query", "queries", ['{"_id": "q2", "text": "again"}'],
       4, "duplicate query id 'q2' (first on line 2)"),
      ("empty_query", "queries", ['{"_id": "q4", "text": ""}'],
       4, "empty text"),
      ("query_missing_text", "queries", ['{"_id": "q4", "txt": "x"}'],
       4, "'text'"),
      ("few_fields", "qrels", ["q1\td2"], 4, "expected 3 tab-separated"),
      ("many_fields", "qrels", ["q1\t0\td2\t1"], 4, "got 4"),
      ("float_score", "qrels", ["q1\td2\t0.5"], 4, "non-integer score '0.5'"),
      ("unknown_query", "qrels", ["q9\td1\t1"], 4, "unknown query id 'q9'"),
      ("unknown_doc", "qrels", ["q1\td9\t1"], 4, "unknown document id 'd9'"),
      ("duplicate_judgment", "qrels", ["q1\td1\t2"],
       4, "duplicate judgment ('q1', 'd1') (first on line 2)"),
  )
  def test_problem_line(self, which, extra, lineno, message):
    base = {"corpus": _CORPUS, "queries": _QUERIES, "qrels": _QRELS}
    root = self._write(**{which: base[which] + extra})
    filename = {
        "corpus": "corpus.jsonl",
        "queries": "queries.jsonl",
        "qrels": "test.tsv",
    }[which]
    location = f"{filename}:{lineno}: "

    with self.assertRaisesRegex(
        ValueError, re.escape(location) + ".*" + re.escape(message)
    ):
      beir.load_beir(root)

    with self.assertLogs(level="WARNING") as logs:
      dataset = beir.load_beir(root, on_error="count")
    self.assertLen(dataset.problems, 1)
    self.assertIn(location, dataset.problems[0])
    self.assertIn(message, dataset.problems[0])
    self.assertIn("skipped 1 problem line", "\n".join(logs.output))
    # Everything else still loads, and the first of two duplicates wins.
    self.assertEqual(dataset.corpus["d1"], "Title one text one")
    self.assertEqual(dataset.qrels, {"q1": {"d1": 1}, "q2": {"d2": 0}})

  def test_invalid_utf8(self):
    root = self._write()
    with (root / "corpus.jsonl").open("ab") as f:
      f.write(b'{"_id": "d3", "text": "\xff"}\n')
    with self.assertRaisesRegex(
        ValueError, r"corpus\.jsonl:3: not valid UTF-8"
    ):
      beir.load_beir(root)
    self.assertLen(beir.load_beir(root, on_error="count").problems, 1)

  def test_counts_every_problem(self):
    root = self._write(
        corpus=_CORPUS + ["{", '{"_id": "d1", "text": "t"}'],
        qrels=_QRELS + ["q1\td9\t1", "bad", "q9\td1\tx"],
    )
    dataset = beir.load_beir(root, on_error="count")
    self.assertEqual(
        [p.rsplit("/", 1)[-1].split(": ")[0] for p in dataset.problems],
        [
            "corpus.jsonl:3",
            "corpus.jsonl:4",
            "test.tsv:4",
            "test.tsv:5",
            "test.tsv:6",
        ],
    )

  def test_missing_split_lists_available_splits(self):
    root = self._write(split="dev")
    with self.assertRaisesRegex(
        FileNotFoundError, r"test\.tsv.*available splits: \['dev'\]"
    ):
      beir.load_beir(root)
    self.assertEqual(beir.available_splits(root), ["dev"])
    self.assertLen(beir.load_beir(root, "dev").queries, 2)

  def test_missing_files(self):
    root = self._write()
    (root / "queries.jsonl").unlink()
    with self.assertRaisesRegex(FileNotFoundError, r"queries\.jsonl"):
      beir.load_beir(root, on_error="count")
    with self.assertRaisesRegex(FileNotFoundError, "no such dataset directory"):
      beir.load_beir(root / "nope")

  def test_read_directory_keeps_titles_and_reads_every_split(self):
    root = self._write()
    (root / "qrels" / "train.tsv").write_text("q3\td2\t1\nq3\td7\t1\n")
    with self.assertRaisesRegex(ValueError, r"train\.tsv:2: unknown document"):
      beir.read_directory(root)
    raw = beir.read_directory(root, on_error="count")
    self.assertEqual(
        raw.documents, {"d1": ("Title one", "text one"), "d2": ("", "text two")}
    )
    self.assertEqual(list(raw.queries), ["q1", "q2", "q3"])
    self.assertEqual(
        raw.qrels,
        {
            "test": {"q1": {"d1": 1}, "q2": {"d2": 0}},
            "train": {"q3": {"d2": 1}},
        },
    )
    self.assertLen(raw.problems, 1)
    self.assertEqual(beir.read_directory(root, ["test"]).qrels.keys(), {"test"})

  def test_load_returns_plain_dicts(self):
    corpus, queries, qrels = beir.load(self._write())
    self.assertEqual(corpus, {"d1": "Title one text one", "d2": "text two"})
    self.assertEqual(queries, {"q1": "query one", "q2": "query two"})
    self.assertEqual(qrels, {"q1": {"d1": 1}, "q2": {"d2": 0}})

  def test_integer_ids_and_duplicate_after_conversion(self):
    root = self._write(
        corpus=_CORPUS
        + ['{"_id": 7, "text": "seven"}', '{"_id": "7", "text": "x"}'],
        qrels=_QRELS + ["q1\t7\t1"],
    )
    with self.assertRaisesRegex(
        ValueError, r"corpus\.jsonl:4: duplicate document id '7'"
    ):
      beir.load_beir(root)
    dataset = beir.load_beir(root, on_error="count")
    self.assertEqual(dataset.corpus["7"], "seven")
    self.assertEqual(dataset.qrels["q1"], {"d1": 1, "7": 1})

  def test_bad_on_error(self):
    # TypeError when the jaxtyping/beartype hook checks the Literal first.
    with self.assertRaises((ValueError, TypeError)):
      beir.load_beir(self._write(), on_error="ignore")


if __name__ == "__main__":
  absltest.main()
