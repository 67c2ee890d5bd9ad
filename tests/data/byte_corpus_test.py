"""Tests for lowrank.data.byte_corpus."""

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from lowrank.data import byte_corpus


class ByteCorpusTest(parameterized.TestCase):

  def _file(self, text):
    return "file:" + self.create_tempfile(content=text).full_path

  def test_split_and_windows(self):
    spec = self._file("abcdefghij" * 100)  # 1000 bytes.
    name, train, val = byte_corpus.load(spec, val_fraction=0.2, seq_len=8,
                                        batch_size=4, eval_batches=3)
    self.assertEqual(len(train), 800)
    self.assertEqual(train.dtype, np.int32)
    np.testing.assert_array_equal(train[:3], [97, 98, 99])
    self.assertLen(val, 3)
    self.assertEqual(val[0].shape, (4, 8))
    self.assertTrue(name.endswith(".txt") or name)

  def test_lee_from_the_gensim_wheel(self):
    name, train, _ = byte_corpus.load("lee", val_fraction=0.1, seq_len=16,
                                      batch_size=2, eval_batches=1)
    self.assertEqual(name, "gensim lee")
    self.assertGreater(len(train), 300_000)

  def test_too_short(self):
    with self.assertRaisesRegex(ValueError, "is too short: train"):
      byte_corpus.load(self._file("abc" * 10), val_fraction=0.1, seq_len=8,
                       batch_size=4, eval_batches=1)

  @parameterized.parameters("imagenet", "file:")
  def test_unknown_spec(self, spec):
    with self.assertRaisesRegex(ValueError, "must be 'auto'"):
      byte_corpus.files(spec)

  def test_missing_file(self):
    with self.assertRaisesRegex(FileNotFoundError,
                                "file '/nonexistent/c.txt' does not exist"):
      byte_corpus.files("file:/nonexistent/c.txt")


if __name__ == "__main__":
  absltest.main()
