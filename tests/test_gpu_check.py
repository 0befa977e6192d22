"""gpu_check.sh: the parts a CPU can run (DEVICE=cpu), on the tiny preset, end to end."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_parts_pass_and_write_the_summary(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    # No Inception weights, whatever this machine holds: the tiny preset's digits need none.
    env.update(DEVICE="cpu", OMP_NUM_THREADS="1", MEANFLOW_INCEPTION_WEIGHTS=str(tmp_path / "missing.pth"))
    done = subprocess.run(["bash", str(ROOT / "gpu_check.sh"), "", str(tmp_path / "out")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    status = {name: part["status"] for name, part in summary["parts"].items()}
    assert status == {"compile": "skip", "sync": "skip", "nccl": "skip", "torchrun": "pass", "sample": "pass",
                      "evaluate": "pass", "rows": "pass"}, summary
    assert "net_ema 1-step digits quality: FD" in summary["parts"]["evaluate"]["detail"]
    assert summary["passed"] and (tmp_path / "out" / "grid.png").exists()
