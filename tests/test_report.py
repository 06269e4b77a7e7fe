"""`lmos report`: reading metrics.jsonl, the plotted data, the HTML page, errors."""

import json
import math

import matplotlib.image
import numpy as np
import pytest

from lmos_jax.train import report as rp


def _write_run(wd, rows, lr=1e-3, extra_lines=""):
  wd.mkdir(parents=True)
  text = "".join(json.dumps(r) + "\n" for r in rows) + extra_lines
  (wd / "metrics.jsonl").write_text(text)
  (wd / "config.json").write_text(json.dumps({"model": {"d_model": 64},
                                              "train": {"lr": lr, "steps": len(rows)}}))


def _rows(n, scale):
  out = []
  for s in range(1, n + 1):
    r = {"step": s, "loss": scale * 5.0 / s, "lr": 1e-3 * min(1.0, s / 3),
         "tokens_per_sec": float("nan") if s == 1 else 1000.0 + s, "mfu": 0.01 * s,
         "grad_norm": 1.0 / s}
    if s % 2 == 0:
      r["eval_loss"] = scale * 6.0 / s
    out.append(r)
  return out


def test_two_runs_png_html_and_summary(tmp_path):
  a, b = tmp_path / "run_a", tmp_path / "run_b"
  _write_run(a, _rows(6, 1.0), lr=1e-3)
  _write_run(b, _rows(4, 2.0), lr=3e-3)
  out = tmp_path / "out"
  assert rp.main(["lmos report", str(a), str(b), "--out", str(out)]) == 0
  img = matplotlib.image.imread(out / "report.png")
  assert img.shape[:2] == (800, 1500) and img[..., :3].std() > 0.05  # drawn, not blank
  page = (out / "report.html").read_text()
  assert "data:image/png;base64," in page and "run_a" in page and "run_b" in page
  assert "<td>train.lr</td><td>0.001</td><td>0.003</td>" in page  # only differing keys
  assert "train.steps" in page and "model.d_model" not in page

  # float64 values that JSON carries exactly; approx's default rel 1e-6 only spares the order
  # of float64 operations (~1e-16), e.g. 100 * median(x) vs median(100 * x)
  s = rp.summarize(rp.load_run(a))
  assert s["last step"] == 6 and s["final loss"] == pytest.approx(5.0 / 6)
  assert s["best eval loss"] == pytest.approx(1.0) and s["at step"] == 6
  assert s["median tokens/s"] == pytest.approx(np.median([1002, 1003, 1004, 1005, 1006]))
  assert s["median MFU %"] == pytest.approx(100 * np.median([0.01 * k for k in range(1, 7)]))


def test_figure_lines_hold_the_logged_values(tmp_path):
  _write_run(tmp_path / "r", _rows(5, 1.0))
  run = rp.load_run(tmp_path / "r")
  fig = rp.make_figure([run])
  by_title = {ax.get_title(): ax for ax in fig.axes}
  # float64 data drawn as given (MFU at most one multiplication by 100 apart): the default
  # rtol 1e-7 is far above float64 rounding (1e-16)
  (loss_line,) = by_title["train loss"].get_lines()
  np.testing.assert_allclose(loss_line.get_xdata(), [1, 2, 3, 4, 5])
  np.testing.assert_allclose(loss_line.get_ydata(), [5.0 / s for s in range(1, 6)])
  (eval_line,) = by_title["eval loss"].get_lines()
  np.testing.assert_allclose(eval_line.get_xdata(), [2, 4])
  (tps,) = by_title["tokens / s"].get_lines()
  assert list(tps.get_xdata()) == [2, 3, 4, 5]  # the NaN first-step rate is left out
  (mfu,) = by_title["MFU (%)"].get_lines()
  np.testing.assert_allclose(mfu.get_ydata(), [1.0, 2.0, 3.0, 4.0, 5.0])  # percent


def test_smoothing_is_an_ema():
  x = np.array([1.0, 3.0, 2.0, 5.0])
  alpha, acc, ref = 0.6, 1.0, []
  for v in x:
    acc = alpha * acc + (1 - alpha) * v
    ref.append(acc)
  np.testing.assert_allclose(rp.ema(x, alpha), ref)  # the same float64 recurrence: bit-equal
  np.testing.assert_array_equal(rp.ema(x, 0.0), x)


def test_resumed_steps_last_row_wins_and_torn_tail_is_noted(tmp_path):
  rows = _rows(4, 1.0) + [{"step": 3, "loss": 0.123}]  # resumed from step 2, re-logged 3
  _write_run(tmp_path / "r", rows, extra_lines='{"step": 5, "lo')
  run = rp.load_run(tmp_path / "r")
  assert [r["step"] for r in run.rows] == [1, 2, 3, 4]
  assert run.rows[2]["loss"] == 0.123
  assert run.notes and "torn last line" in run.notes[0]


def test_errors_name_the_workdir(tmp_path, capsys):
  assert rp.main(["lmos report", str(tmp_path / "nope")]) == 2
  assert "has no metrics.jsonl" in capsys.readouterr().err
  bad = tmp_path / "bad"
  _write_run(bad, _rows(2, 1.0))
  (bad / "metrics.jsonl").write_text('{"step": 1, "loss": 1}\nnot json\n{"step": 3, "loss": 1}\n')
  with pytest.raises(rp.ReportError, match="line 2 is not JSON"):
    rp.load_run(bad)
  with pytest.raises(rp.ReportError, match="--smooth"):
    rp.report([tmp_path / "bad"], tmp_path / "o", smooth=1.5)


def test_single_run_default_out_dir(tmp_path, capsys):
  _write_run(tmp_path / "r", _rows(3, 1.0))
  assert rp.main(["lmos report", str(tmp_path / "r"), "--smooth", "0.5"]) == 0
  assert (tmp_path / "r" / "report" / "report.png").is_file()
  out = capsys.readouterr().out
  # the table prints 4 significant digits ('.4g'): rounding is < 5e-4 relative
  assert "final loss" in out and math.isclose(float(out.split("\n")[1].split()[2]), 5 / 3,
                                              rel_tol=1e-3)
