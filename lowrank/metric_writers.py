"""Experiment metrics: a CSV, a JSONL log and TensorBoard event files.

`MetricWriter(workdir)` writes every scalar it is given to

* `metrics.csv` (one row per `write` call, columns grow as new names
  appear: the file is rewritten atomically when they do),
* `metrics.jsonl` (one JSON object per row),
* TensorBoard event files under `workdir/tensorboard` (via `tensorboardX`,
  no TensorFlow), readable with `tensorboard --logdir workdir/tensorboard`.

Runs resume: `MetricWriter(workdir, resume_step=s)` drops rows with
`step > s` from the CSV/JSONL (the steps a killed run logged after its last
checkpoint, which the resumed run will log again) and TensorBoard's
`purge_step` hides the same steps in the event files, so a resumed run's logs
equal an uninterrupted run's.

`plot_metrics(csv_paths, names, out_png)` draws curves (one line per run).
`plot_curves_and_points` draws one metric's curves beside one point per run.
Both save through `save_figure` (any matplotlib figure, written atomically;
`pyplot` gives matplotlib on its Agg backend).
Only the process with `jax.process_index() == 0` writes; the others get a
writer whose methods do nothing, so multi-host code calls it unconditionally.
"""

from collections.abc import Mapping, Sequence
import csv
import json
import math
import os
from typing import Any

import jax
import numpy as np


def _atomic_write(path: str, text: str) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as indented, key-sorted JSON atomically (tmp + rename).

  NumPy / JAX scalars are written as floats; a crash leaves either the old
  file or the new one, never a torn one.
  """
  _atomic_write(path, json.dumps(obj, indent=2, sort_keys=True,
                                 default=float) + "\n")


def read_json(path: str) -> Any:
  """The JSON in `path`, or None when there is no such file (a run's
  results or cached metrics not written yet)."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)

def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], *,
                   digits: int = 4) -> str:
  """A Markdown table, the first column left-aligned and the rest right.

  Cells: floats with `digits` decimals, None as "-", others as `str`.

  Raises:
    ValueError: If a row has not one cell per header column.
  """
  def cell(v):
    if v is None:
      return "-"
    return f"{v:.{digits}f}" if isinstance(v, (float, np.floating)) else str(v)
  lines = ["| " + " | ".join(map(str, header)) + " |",
           "|---|" + "---:|" * (len(header) - 1)]
  for i, row in enumerate(rows):
    if len(row) != len(header):
      raise ValueError(f"Row {i} has {len(row)} cells for {len(header)} "
                       f"columns {list(header)}; give one cell per column "
                       f"(None for an empty one).")
    lines.append("| " + " | ".join(map(cell, row)) + " |")
  return "\n".join(lines)


def write_results(workdir: str, results: Any, markdown: str) -> str:
  """Writes `results.json` and `results.md` in `workdir`; returns `markdown`.

  Both atomically (a killed run leaves the old files or the new ones).
  """
  write_json(os.path.join(workdir, "results.json"), results)
  _atomic_write(os.path.join(workdir, "results.md"), markdown + "\n")
  return markdown


def read_csv(path: str) -> list[dict[str, float | int]]:
  """Rows of a `metrics.csv` as dicts of floats (`step` as int).

  Raises:
    ValueError: If a row has a non-numeric value (names file and line).
  """
  rows = []
  with open(path, newline="") as f:
    for line, row in enumerate(csv.DictReader(f), start=2):
      out = {}
      for k, v in row.items():
        if v in ("", None):
          continue
        try:
          out[k] = int(v) if k == "step" else float(v)
        except ValueError as e:
          raise ValueError(
              f"{path}:{line}: column {k!r} is not a number: {v!r}") from e
      rows.append(out)
  return rows


class MetricWriter:
  """Scalars to CSV + JSONL + TensorBoard in `workdir`; resumable.

  Args:
    workdir: Directory (created).
    resume_step: The step training resumes from (0 for a fresh run): logged
      rows after it are dropped.
    tensorboard: Also write TensorBoard event files.
  """

  def __init__(self, workdir: str, *, resume_step: int = 0,
               tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.workdir = workdir
    self.csv_path = os.path.join(workdir, "metrics.csv")
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self._rows: list[dict[str, Any]] = []
    self._columns: list[str] = ["step"]
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if os.path.exists(self.csv_path):
      kept = [r for r in read_csv(self.csv_path)
              if r.get("step", 0) <= resume_step]
      for r in kept:
        self._add_columns(r)
      self._rows = kept
      self._rewrite()
    elif os.path.exists(self.jsonl_path):
      os.remove(self.jsonl_path)  # No CSV: a stale log from another tool.
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(
          os.path.join(workdir, "tensorboard"),
          purge_step=resume_step + 1 if resume_step else None,
          flush_secs=10)

  def _add_columns(self, row: Mapping[str, Any]) -> bool:
    new = [k for k in row if k not in self._columns]
    self._columns.extend(new)
    return bool(new)

  def _rewrite(self) -> None:
    lines = [",".join(self._columns)]
    lines += [self._csv_line(r) for r in self._rows]
    _atomic_write(self.csv_path, "\n".join(lines) + "\n")
    _atomic_write(self.jsonl_path,
                  "".join(json.dumps(r) + "\n" for r in self._rows))

  def _csv_line(self, row: Mapping[str, Any]) -> str:
    return ",".join("" if row.get(c) is None else repr(row[c])
                    for c in self._columns)

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Logs `scalars` (numbers or 0-d arrays) at `step`.

    Raises:
      ValueError: On a non-scalar value or a name with a comma/newline.
    """
    if not self.enabled:
      return
    row: dict[str, Any] = {"step": int(step)}
    for name, value in scalars.items():
      if "," in name or "\n" in name or name == "step":
        raise ValueError(f"Bad metric name {name!r} (no commas/newlines; "
                         "'step' is reserved).")
      arr = np.asarray(jax.device_get(value))
      if arr.size != 1:
        raise ValueError(
            f"Metric {name!r} must be a scalar; got shape {arr.shape}.")
      v = arr.reshape(()).item()
      row[name] = int(v) if isinstance(v, (bool, np.bool_)) else (
          v if isinstance(v, int) else float(v))
      if self._tb is not None and math.isfinite(float(v)):
        self._tb.add_scalar(name, float(v), int(step))
    self._rows.append(row)
    if self._add_columns(row):
      self._rewrite()
      return
    with open(self.csv_path, "a") as f:
      f.write(self._csv_line(row) + "\n")
    with open(self.jsonl_path, "a") as f:
      f.write(json.dumps(row) + "\n")

  @property
  def rows(self) -> list[dict[str, Any]]:
    return list(self._rows)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def pyplot() -> Any:
  """`matplotlib.pyplot` on the non-interactive Agg backend.

  Imported on first use, so that writing metrics never loads matplotlib.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def save_figure(fig: Any, path: str, *, title: str = "") -> str:
  """Saves a matplotlib figure as the PNG `path` atomically; returns `path`.

  The figure gets `title` as its suptitle (none when empty), is laid out
  tightly, written to a temporary file renamed over `path` (a crash leaves
  the old picture or the new one), and closed.
  """
  plt = pyplot()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  tmp = path + ".tmp.png"
  try:
    fig.savefig(tmp, dpi=110)
  finally:
    plt.close(fig)
  os.replace(tmp, path)
  return path


def plot_metrics(
    runs: Mapping[str, str | Sequence[Mapping[str, float | int]]],
    names: Sequence[str],
    out_png: str,
    *,
    title: str = "",
    logy: bool = False,
) -> str:
  """One subplot per metric name, one line per run; saves `out_png`.

  Args:
    runs: Label → a `metrics.csv` path or a list of row dicts.
    names: Metric columns to plot against `step`.
    out_png: Output path (written atomically).
    title: Figure title.
    logy: Log-scale y axes.

  Returns:
    `out_png`.

  Raises:
    ValueError: If no run has any of `names`.
  """
  plt = pyplot()
  fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6),
                           squeeze=False)
  drawn = 0
  for label, rows in runs.items():
    if isinstance(rows, str):
      rows = read_csv(rows)
    for ax, name in zip(axes[0], names):
      pts = [(r["step"], r[name]) for r in rows if name in r]
      if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, label=label, marker="." if len(xs) < 30 else None)
        drawn += 1
  if not drawn:
    plt.close(fig)
    raise ValueError(f"No run has any of the metrics {list(names)}.")
  for ax, name in zip(axes[0], names):
    ax.set_xlabel("step")
    ax.set_ylabel(name)
    if logy:
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  return save_figure(fig, out_png, title=title)


def plot_curves_and_points(
    curves: Mapping[str, str | Sequence[Mapping[str, float | int]]],
    metric: str,
    points: Mapping[str, tuple[float, float]],
    out_png: str,
    *,
    curve_label: str = "",
    points_labels: tuple[str, str] = ("", ""),
    reference: tuple[str, float] | None = None,
    title: str = "",
) -> str:
  """Two panels: `metric` against `step` per run, and one point per run.

  Args:
    curves: Label → a `metrics.csv` path or a list of row dicts.
    metric: The column of the curves (the left panel's y label by default).
    points: Label → `(x, y)`, e.g. (optimizer-state MiB, final nDCG@10).
    out_png: Output path (written atomically).
    curve_label: The left panel's y label (default: `metric`).
    points_labels: The right panel's `(x label, y label)`.
    reference: `(label, y)` of a dashed horizontal line on the right panel
      (e.g. the zero-shot score).
    title: Figure title.

  Returns:
    `out_png`.
  """
  plt = pyplot()
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
  for label, rows in curves.items():
    rows = read_csv(rows) if isinstance(rows, str) else rows
    pts = [(r["step"], r[metric]) for r in rows if metric in r]
    ax1.plot([s for s, _ in pts], [v for _, v in pts], label=label)
  for label, (x, y) in points.items():
    ax2.scatter(x, y, label=label, s=40)
  if reference is not None:
    ax2.axhline(reference[1], color="gray", ls="--", label=reference[0])
  ax1.set(xlabel="step", ylabel=curve_label or metric)
  ax2.set(xlabel=points_labels[0], ylabel=points_labels[1])
  for ax in (ax1, ax2):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  return save_figure(fig, out_png, title=title)
