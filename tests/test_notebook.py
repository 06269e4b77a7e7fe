"""The Colab quickstart runs top to bottom (small setting) in a fresh kernel, so it cannot rot."""

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "experiments" / "colab_quickstart.ipynb"


def _text(cell) -> str:
  out = []
  for o in cell.get("outputs", []):
    if o.get("output_type") == "stream":
      out.append(o["text"])
    elif "data" in o and "text/plain" in o["data"]:
      out.append(o["data"]["text/plain"])
  return "".join(out)


@pytest.mark.slow
def test_colab_quickstart_executes_small(tmp_path, monkeypatch):
  import nbclient  # the `test` extra
  import nbformat

  (tmp_path / "configs").symlink_to(REPO / "configs")  # the notebook runs from a repo root
  monkeypatch.setenv("LMOS_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError naming the failing cell
  for i, c in enumerate(nb.cells):  # per-cell seconds, to keep the CI budget in view
    ex = c.get("metadata", {}).get("execution", {})
    if "shell.execute_reply" in ex:
      from datetime import datetime
      t0, t1 = (datetime.fromisoformat(ex[k].replace("Z", "+00:00"))
                for k in ("iopub.execute_input", "shell.execute_reply"))
      print(f"cell {i}: {(t1 - t0).total_seconds():.1f} s")

  code = [c for c in nb.cells if c.cell_type == "code"]
  texts = [_text(c) for c in code]
  lines = (tmp_path / "runs/colab_lm/metrics.jsonl").read_text().splitlines()
  rows = [json.loads(x) for x in lines]
  assert [r["step"] for r in rows] == [2, 3, 4, 6]  # log every 2, eval every 3
  assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6]
  assert rows[-1]["loss"] < rows[0]["loss"] + 0.5 and "eval_loss" in rows[-1]
  images = [o for c in code for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(images) >= 2  # the loss plot and the report figure
  assert (tmp_path / "runs/colab_lm/report/report.png").is_file()
  sample = next(t for t in texts if "--- sample after 6 steps (" in t)
  assert len(sample.split("---\n", 1)[1].strip()) > 0
  preds = next(t for t in texts if "label " in t and "p=" in t).strip().splitlines()
  assert len(preds) == 2 and all(p.split()[1] in ("0", "1") for p in preds)
  assert (tmp_path / "runs/colab_sst2_lora/metrics.jsonl").is_file()
