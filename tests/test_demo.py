"""demo.ipynb runs end to end, headless, on a checkpoint that train.py writes in a few steps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def _kernel_for_this_python(folder: Path) -> None:
    """A 'python3' kernel spec running this interpreter, found first through JUPYTER_PATH.

    So the notebook runs in the environment of the tests even where no kernel was ever installed.
    """
    spec = folder / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "Python 3", "language": "python"}))


@pytest.mark.slow
def test_demo_notebook_runs(tmp_path, monkeypatch):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "train.py", "--preset", "tiny", "--max_steps", "2", "--output_dir", str(out),
                    "--not_compile", "--device", "cpu"], cwd=ROOT, env=env, check=True, capture_output=True)
    ckpt = out / "checkpoint-last.pth"
    assert ckpt.is_file()

    _kernel_for_this_python(tmp_path / "jupyter")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MEANFLOW_DEMO_CKPT", str(ckpt))
    # No Inception weights here: nothing may ask for them.
    monkeypatch.setenv("MEANFLOW_INCEPTION_WEIGHTS", str(tmp_path / "missing.pth"))
    nb = nbformat.read(ROOT / "demo.ipynb", as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    text = "".join(o.get("text", "") for o in outputs)
    assert len(images) == 2, text
    assert "1-step samples" in text and "2-step samples" in text
    # A digits checkpoint: its figure, no Inception weights asked for.
    assert "1 step(s): digits FD" in text and "FID skipped: not the figure of digits" in text
