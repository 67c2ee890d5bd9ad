"""Tests of lowrank.metric_writers: CSV/JSONL/TensorBoard, resume, plots."""

import glob
import json
import os

from absl.testing import absltest
import jax.numpy as jnp

from lowrank import metric_writers


def _tb_scalars(logdir, tag):
  """(step, value) pairs of `tag` in the event files, as TensorBoard reads."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  import struct  # pylint: disable=g-import-not-at-top
  out = []
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.*"))):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):  # TFRecord: len, crc, payload, crc.
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      payload = data[pos + 12:pos + 12 + n]
      pos += 12 + n + 4
      ev = event_pb2.Event.FromString(payload)
      for v in ev.summary.value:
        if v.tag == tag:
          out.append((ev.step, v.simple_value))
  return out


class MetricWriterTest(absltest.TestCase):

  def test_writes_csv_jsonl_and_tensorboard(self):
    wd = self.create_tempdir().full_path
    with metric_writers.MetricWriter(wd) as w:
      w.write(1, {"loss": 2.5})
      w.write(2, {"loss": jnp.float32(1.5), "lr": 0.1})  # A new column.
    rows = metric_writers.read_csv(os.path.join(wd, "metrics.csv"))
    self.assertEqual(rows, [{"step": 1, "loss": 2.5},
                            {"step": 2, "loss": 1.5, "lr": 0.1}])
    with open(os.path.join(wd, "metrics.jsonl")) as f:
      self.assertEqual([json.loads(x)["step"] for x in f], [1, 2])
    self.assertEqual(_tb_scalars(os.path.join(wd, "tensorboard"), "loss"),
                     [(1, 2.5), (2, 1.5)])

  def test_resume_drops_rows_after_the_checkpoint(self):
    wd = self.create_tempdir().full_path
    with metric_writers.MetricWriter(wd) as w:
      for s in range(1, 6):
        w.write(s, {"loss": float(s)})
    # Killed after step 5; the checkpoint was at step 3: rerun from there.
    with metric_writers.MetricWriter(wd, resume_step=3) as w:
      for s in range(4, 7):
        w.write(s, {"loss": 10.0 * s})
    rows = metric_writers.read_csv(os.path.join(wd, "metrics.csv"))
    self.assertEqual([(r["step"], r["loss"]) for r in rows],
                     [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0),
                      (6, 60.0)])

  def test_bad_values_and_files(self):
    wd = self.create_tempdir().full_path
    w = metric_writers.MetricWriter(wd, tensorboard=False)
    with self.assertRaisesRegex(ValueError, "must be a scalar"):
      w.write(1, {"x": jnp.ones(3)})
    with self.assertRaisesRegex(ValueError, "Bad metric name"):
      w.write(1, {"a,b": 1.0})
    path = os.path.join(wd, "bad.csv")
    with open(path, "w") as f:
      f.write("step,loss\n1,0.5\n2,oops\n")
    with self.assertRaisesRegex(ValueError, "bad.csv:3: column 'loss'"):
      metric_writers.read_csv(path)

  def _logged_run(self):
    """A workdir whose metrics.csv holds `loss` at steps 1 to 3."""
    wd = self.create_tempdir().full_path
    with metric_writers.MetricWriter(wd, tensorboard=False) as w:
      for s in range(1, 4):
        w.write(s, {"loss": 1.0 / s})
    return wd

  def _assert_png(self, path):
    with open(path, "rb") as f:
      self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")
    self.assertEqual(
        [n for n in os.listdir(os.path.dirname(path)) if ".tmp" in n], [])

  def test_plot(self):
    wd = self._logged_run()
    out = metric_writers.plot_metrics(
        {"run": os.path.join(wd, "metrics.csv"),
         "other": [{"step": 1, "loss": 0.7}]},
        ["loss"], os.path.join(wd, "loss.png"))
    self._assert_png(out)
    with self.assertRaisesRegex(ValueError, "No run has"):
      metric_writers.plot_metrics({"run": [{"step": 1}]}, ["acc"],
                                  os.path.join(wd, "x.png"))

  def test_plot_curves_and_points(self):
    wd = self._logged_run()
    out = metric_writers.plot_curves_and_points(
        {"run": os.path.join(wd, "metrics.csv"), "empty": []}, "loss",
        {"run": (2.5, 0.7), "empty": (1.0, 0.6)}, os.path.join(wd, "p.png"),
        points_labels=("state (MiB)", "nDCG@10"), reference=("zero", 0.5),
        title="runs")
    self._assert_png(out)

  def test_save_figure_titles_writes_and_closes(self):
    plt = metric_writers.pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = os.path.join(self.create_tempdir().full_path, "f.png")
    self.assertEqual(metric_writers.save_figure(fig, path, title="t"), path)
    self._assert_png(path)
    self.assertEqual(fig.get_suptitle(), "t")
    self.assertFalse(plt.fignum_exists(fig.number))

  def test_save_figure_into_a_missing_folder_closes_the_figure(self):
    plt = metric_writers.pyplot()
    fig, _ = plt.subplots()
    path = os.path.join(self.create_tempdir().full_path, "no", "f.png")
    with self.assertRaisesRegex(FileNotFoundError, "No such file"):
      metric_writers.save_figure(fig, path)
    self.assertFalse(plt.fignum_exists(fig.number))


class HelpersTest(absltest.TestCase):

  def test_write_json_is_atomic_and_sorted(self):
    path = os.path.join(self.create_tempdir().full_path, "r.json")
    metric_writers.write_json(path, {"b": jnp.float32(0.5), "a": [1, 2]})
    with open(path) as f:
      text = f.read()
    self.assertEqual(json.loads(text), {"a": [1, 2], "b": 0.5})
    self.assertLess(text.index('"a"'), text.index('"b"'))
    self.assertEqual(os.listdir(os.path.dirname(path)), ["r.json"])

  def test_read_json(self):
    path = os.path.join(self.create_tempdir().full_path, "r.json")
    self.assertIsNone(metric_writers.read_json(path))
    metric_writers.write_json(path, {"a": 1})
    self.assertEqual(metric_writers.read_json(path), {"a": 1})

  def test_markdown_table_and_results(self):
    table = metric_writers.markdown_table(
        ["run", "nDCG@10", "time"], [["bm25", 0.5, None], ["ce", 1, "3 s"]])
    self.assertEqual(table, "| run | nDCG@10 | time |\n|---|---:|---:|\n"
                     "| bm25 | 0.5000 | - |\n| ce | 1 | 3 s |")
    wd = self.create_tempdir().full_path
    self.assertEqual(metric_writers.write_results(wd, {"a": 1}, table), table)
    with open(os.path.join(wd, "results.md")) as f:
      self.assertEqual(f.read(), table + "\n")
    self.assertEqual(sorted(os.listdir(wd)), ["results.json", "results.md"])

  def test_markdown_table_row_of_the_wrong_length(self):
    with self.assertRaisesRegex(ValueError, r"Row 0 has 1 cells for 2 "
                                r"columns \['a', 'b'\]; give one cell"):
      metric_writers.markdown_table(["a", "b"], [[1.0]])

  def test_compiled_memory(self):
    import jax  # pylint: disable=g-import-not-at-top
    from lowrank import optim  # pylint: disable=g-import-not-at-top
    x = jnp.zeros((256, 256), jnp.float32)
    m = optim.compiled_memory(jax.jit(lambda a: a @ a + 1).lower(x).compile())
    self.assertEqual(m["argument_bytes"], 256 * 256 * 4)
    self.assertEqual(m["output_bytes"], 256 * 256 * 4)
    self.assertEqual(m["total_bytes"], m["argument_bytes"] + m["output_bytes"]
                     + m["temp_bytes"] - m["alias_bytes"])


if __name__ == "__main__":
  absltest.main()
