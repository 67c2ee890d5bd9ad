"""Tests for `lowrank.models.hf_io` (HF config + safetensors reading)."""

import json
import pathlib

from absl.testing import absltest
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import numpy as safetensors_numpy

from lowrank.models import hf_io


def _save(path: pathlib.Path, tensors) -> None:
  safetensors_numpy.save_file(tensors, str(path))


class HfIoTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = pathlib.Path(self.create_tempdir().full_path)

  def _single(self, **tensors) -> pathlib.Path:
    (self.dir / hf_io.CONFIG_NAME).write_text(json.dumps({"a": 1}))
    _save(self.dir / hf_io.WEIGHTS_NAME, tensors)
    return self.dir

  def _sharded(self) -> pathlib.Path:
    _save(self.dir / "model-00001-of-00002.safetensors",
          {"x": np.ones(3, np.float32)})
    _save(self.dir / "model-00002-of-00002.safetensors",
          {"y": np.zeros((2, 2), np.float16)})
    index = {"weight_map": {"x": "model-00001-of-00002.safetensors",
                            "y": "model-00002-of-00002.safetensors"}}
    (self.dir / hf_io.WEIGHTS_INDEX_NAME).write_text(json.dumps(index))
    return self.dir

  # Correct answers.

  def test_single_file_reads_names_shapes_dtypes(self):
    path = self._single(w=np.arange(6, dtype=np.float32).reshape(2, 3),
                        n=np.arange(4, dtype=np.int64))
    self.assertEqual(hf_io.read_config(path), {"a": 1})
    tensors = hf_io.open_tensors(path)
    self.assertEqual(sorted(tensors), ["n", "w"])
    self.assertEqual(tensors.shape_dtype("w"), ((2, 3), "F32"))
    self.assertEqual(tensors.shape_dtype("n"), ((4,), "I64"))
    self.assertTrue(hf_io.is_floating("F32"))
    self.assertFalse(hf_io.is_floating("I64"))
    np.testing.assert_array_equal(tensors["w"],
                                  np.arange(6).reshape(2, 3))

  def test_sharded_index_reads_every_shard(self):
    path = self._sharded()
    self.assertLen(hf_io.weight_files(path), 2)
    tensors = hf_io.open_tensors(path)
    self.assertEqual(dict(tensors.items()).keys(), {"x", "y"})
    self.assertEqual(tensors.shape_dtype("y"), ((2, 2), "F16"))

  def test_bf16_reads_and_casts(self):
    value = np.array([1.5, -2.0], ml_dtypes.bfloat16)
    tensors = hf_io.open_tensors(self._single(b=value))
    self.assertEqual(tensors.shape_dtype("b"), ((2,), "BF16"))
    self.assertEqual(tensors["b"].dtype, np.dtype(ml_dtypes.bfloat16))
    out = tensors.read("b", jnp.float32)
    self.assertEqual(out.dtype, np.float32)
    np.testing.assert_array_equal(out, [1.5, -2.0])
    self.assertEqual(tensors.read("b", jnp.bfloat16).dtype,
                     np.dtype(ml_dtypes.bfloat16))

  def test_read_tensor_one_name_or_none(self):
    path = self._single(w=np.ones(2, np.float32))
    np.testing.assert_array_equal(hf_io.read_tensor(path, "w"), [1.0, 1.0])
    self.assertIsNone(hf_io.read_tensor(path, "absent"))

  def test_single_file_wins_over_index(self):
    self._sharded()
    _save(self.dir / hf_io.WEIGHTS_NAME, {"z": np.ones(1, np.float32)})
    self.assertEqual(hf_io.weight_files(self.dir),
                     [self.dir / hf_io.WEIGHTS_NAME])

  # Boundary cases: each raises a clear error.

  def test_missing_directory(self):
    with self.assertRaisesRegex(FileNotFoundError,
                                "Checkpoint directory not found.*nope"):
      hf_io.open_tensors(self.dir / "nope")

  def test_missing_config(self):
    with self.assertRaisesRegex(FileNotFoundError,
                                "Checkpoint file not found.*config.json"):
      hf_io.read_config(self.dir)

  def test_corrupt_config(self):
    (self.dir / hf_io.CONFIG_NAME).write_text("{not json")
    with self.assertRaisesRegex(ValueError, "config.json is not valid JSON"):
      hf_io.read_config(self.dir)

  def test_config_not_an_object(self):
    (self.dir / hf_io.CONFIG_NAME).write_text("[1, 2]")
    with self.assertRaisesRegex(ValueError, "must hold a JSON object; found "
                                "list"):
      hf_io.read_config(self.dir)

  def test_missing_weights(self):
    with self.assertRaisesRegex(
        FileNotFoundError,
        "Weights not found: neither .*model.safetensors nor "
        ".*model.safetensors.index.json exists"):
      hf_io.open_tensors(self.dir)

  def test_pickled_weights_are_named_not_loaded(self):
    (self.dir / hf_io.PICKLED_WEIGHTS_NAME).write_bytes(b"\x80\x04.")
    with self.assertRaisesRegex(FileNotFoundError,
                                "pytorch_model.bin is present.*never loaded"):
      hf_io.open_tensors(self.dir)

  def test_missing_shard(self):
    path = self._sharded()
    (path / "model-00002-of-00002.safetensors").unlink()
    with self.assertRaisesRegex(
        FileNotFoundError,
        "shard not found: .*model-00002-of-00002.safetensors"):
      hf_io.open_tensors(path)

  def test_index_without_weight_map(self):
    (self.dir / hf_io.WEIGHTS_INDEX_NAME).write_text(
        json.dumps({"metadata": {}}))
    with self.assertRaisesRegex(ValueError, "has no 'weight_map' object"):
      hf_io.open_tensors(self.dir)

  def test_corrupt_safetensors_header(self):
    (self.dir / hf_io.WEIGHTS_NAME).write_bytes(b"garbage")
    with self.assertRaisesRegex(
        ValueError, "model.safetensors is not a valid safetensors file"):
      hf_io.open_tensors(self.dir)

  def test_truncated_safetensors(self):
    path = self._single(w=np.ones((64, 64), np.float32))
    data = (path / hf_io.WEIGHTS_NAME).read_bytes()
    (path / hf_io.WEIGHTS_NAME).write_bytes(data[:len(data) // 2])
    with self.assertRaisesRegex(ValueError,
                                "not a valid safetensors file.*corrupt"):
      hf_io.open_tensors(path)

  def test_missing_tensor_name(self):
    tensors = hf_io.open_tensors(self._single(w=np.ones(2, np.float32)))
    with self.assertRaisesRegex(KeyError,
                                "'absent' is not in the checkpoint.*holds w"):
      tensors.read("absent")
    with self.assertRaisesRegex(KeyError, "'absent' is not in"):
      tensors.shape_dtype("absent")

  def test_tensor_in_two_shards(self):
    path = self._sharded()
    _save(path / "model-00002-of-00002.safetensors",
          {"x": np.ones(3, np.float32)})
    with self.assertRaisesRegex(ValueError, "'x' is in both"):
      hf_io.open_tensors(path)

  def test_check_names_lists_missing_and_unexpected(self):
    with self.assertRaisesRegex(
        ValueError,
        r"Checkpoint ckpt does not match the model; unexpected tensors: "
        r"bert\.extra; missing tensors: a, b"):
      hf_io.check_names("ckpt", {"extra": "bert.extra", "c": "c"},
                        ["a", "b", "c"], "the model")
    hf_io.check_names("ckpt", ["a"], ["a"], "the model")  # No error.

  def test_check_names_truncates_long_lists(self):
    with self.assertRaisesRegex(ValueError, r"missing tensors: .*\(\+5 more\)"):
      hf_io.check_names("ckpt", [], [f"t{i:02d}" for i in range(15)], "m")


if __name__ == "__main__":
  absltest.main()
