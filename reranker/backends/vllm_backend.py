"""Scoring through a vLLM OpenAI-compatible server: one-token completions with label logprobs."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import httpx

from reranker.backends.base import LabelRead
from reranker.config import POINTWISE_LABELS, RerankerConfig, Scoring
from reranker.errors import BackendError, LabelTokenError, RerankerConfigError
from reranker.prompt import PromptRenderer
from runtime.batching import BatchObserver

log = logging.getLogger(__name__)

_RETRY_STATUSES = {429, 500, 502, 503, 504}
# The first vLLM release rankd is tested on that honours logprob_token_ids on /v1/completions
# (the [gpu] extra's floor).
MIN_VLLM = "0.32"


class VllmBackend:
    """Sends prompts as token ids, so the server reads exactly the tokens rankd rendered.

    ``logprob_token_ids`` makes the server return the full-vocabulary logprob of each label token
    at the generated position; ``return_tokens_as_token_ids`` keys them by id, not by text.
    """

    name = "vllm"
    RECHECK_S = 2.0  # between label checks while the server has not been checked

    def __init__(self, config: RerankerConfig, tokenizer: Any,
                 client: httpx.AsyncClient | None = None) -> None:
        self.url = config.vllm_url.rstrip("/")
        self.detail = f"the vLLM server at {self.url}"
        self.model_name = config.vllm_model_name or config.model
        if not self.model_name:
            raise RerankerConfigError(
                "the vllm reranker needs the served model: set RANKD_RERANKER_MODEL (the model "
                "vLLM was started with; its tokenizer is loaded from there) and, if vLLM uses "
                "--served-model-name, RANKD_RERANKER_VLLM_MODEL_NAME"
            )
        self.tokenizer = tokenizer
        self.labels = config.label_alphabet.labels()
        self.use_chat_template = config.chat_template
        self.rank_template = config.rank_template
        # Pointwise scoring reads yes and no where its own template ends.
        self.pointwise_template = (config.pointwise_template
                                   if config.scoring is Scoring.POINTWISE else None)
        self.timeout_s = config.timeout_s
        self.retries = config.retries
        self.client = client or httpx.AsyncClient(
            base_url=self.url,
            timeout=httpx.Timeout(config.timeout_s, connect=min(5.0, config.timeout_s)),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
        )
        self.context_length: int | None = None  # the server's max_model_len, once asked
        self._checked = False  # the served model and the label tokens have been cross-checked
        self._mismatch: str | None = None  # why the labels cannot be trusted, once found
        self._check_lock = asyncio.Lock()
        self._next_check = 0.0
        # The server's own account of its last failure (a 5xx body), kept so that a server that
        # died after it is reported by its cause, not only as "unreachable".
        self.last_server_error: str | None = None

    @classmethod
    async def create(cls, config: RerankerConfig, tokenizer: Any,
                     observer: BatchObserver | None = None) -> VllmBackend:
        # vLLM batches continuously on its side; no client-side batcher is needed.
        return cls(config, tokenizer)

    async def start(self) -> None:
        """Check the server once. An unreachable server is not fatal: rankd degrades and recovers;
        a server that tokenizes labels differently from the local tokenizer is."""
        await self._check_server()

    async def _check_server(self) -> bool:
        """The served model and its label tokens, cross-checked: True once done, False while the
        server cannot be asked. Raises LabelTokenError on a mismatch."""
        try:
            models = (await self.client.get("/v1/models", timeout=5.0)).json()
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("vLLM at %s is not reachable (%s); reranking falls back to retrieval "
                        "order until it is, and its labels are checked then", self.url, exc)
            return False
        data = models.get("data") if isinstance(models, dict) else None
        served = [m.get("id") for m in data if isinstance(m, dict)] if isinstance(data, list) else []
        if self.model_name not in served:
            log.error("vLLM at %s serves %s, not %r: set RANKD_RERANKER_VLLM_MODEL_NAME", self.url,
                      served, self.model_name)
            return False
        assert isinstance(data, list)
        length = next((m.get("max_model_len") for m in data
                       if isinstance(m, dict) and m.get("id") == self.model_name), None)
        if isinstance(length, int) and length >= 16:
            self.context_length = length
        renderer = PromptRenderer(self.tokenizer, self.use_chat_template)
        checks = [(renderer.answer_context(self.rank_template), self.labels)]
        if self.pointwise_template is not None:
            checks.append((renderer.item_answer_context(self.pointwise_template),
                           list(POINTWISE_LABELS)))
        for context, labels in checks:
            if not await self.verify_labels(context, labels):
                return False
        self._checked = True
        return True

    async def _ensure_checked(self) -> None:
        """A server that was down at start-up is cross-checked once it answers.

        One call at a time runs the check, at most every ``RECHECK_S``; the others go on
        rather than queue behind it. A mismatch found then cannot stop a running service, so
        it fails every rerank call (the service answers in retrieval order) and /ready reports
        it until rankd is reconfigured.
        """
        now = time.monotonic()
        if (not self._checked and self._mismatch is None and not self._check_lock.locked()
                and now >= self._next_check):
            async with self._check_lock:
                self._next_check = now + self.RECHECK_S
                try:
                    await self._check_server()
                except LabelTokenError as exc:
                    self._mismatch = str(exc)
                    log.error("vLLM label check failed; reranking is off: %s", exc)
        if self._mismatch is not None:
            raise BackendError("label_mismatch", self._mismatch)

    async def verify_labels(self, context: str, labels: list[str] | None = None) -> bool:
        """Cross-check the local tokenizer with the server's /tokenize: each label (default: the
        alphabet's) after the prompt's ending must tokenize identically on both sides, so the
        label ids rankd asks for are the server's label tokens. False when the server could not
        be asked."""
        for label in labels or self.labels:
            text = context + label
            try:
                response = await self.client.post(
                    "/tokenize",
                    json={"model": self.model_name, "prompt": text, "add_special_tokens": False},
                    timeout=5.0,
                )
                response.raise_for_status()
                served = [int(t) for t in response.json()["tokens"]]
            except (httpx.HTTPError, KeyError, ValueError, TypeError) as exc:
                log.warning("could not verify labels against vLLM /tokenize: %s", exc)
                return False
            local = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if served != local:
                raise LabelTokenError(
                    f"the prompt ending with label {label!r} is tokens {local[-3:]} (last three) "
                    f"for the local tokenizer but {served[-3:]} for the vLLM server at {self.url}; "
                    "RANKD_RERANKER_MODEL must name the model vLLM serves (its tokenizer renders "
                    "the prompts)"
                )
        return True

    async def _post_completions(self, payload: dict[str, Any]) -> dict[str, Any]:
        last: BackendError | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(min(0.1 * 2 ** (attempt - 1), 2.0))
            try:
                response = await self.client.post("/v1/completions", json=payload)
            except httpx.TimeoutException:
                last = BackendError("timeout", f"vLLM at {self.url} did not answer within "
                                               f"{self.timeout_s}s")
                continue
            except httpx.TransportError as exc:
                last = BackendError("unreachable", f"vLLM at {self.url} is unreachable: {exc!r}"
                                                   f"{self._after_failure()}")
                continue
            if response.status_code in _RETRY_STATUSES:
                self.last_server_error = f"{response.status_code} {response.text[:500]}"
                last = BackendError("server_error", f"vLLM answered {response.status_code}: "
                                                    f"{response.text[:300]}")
                continue
            if response.status_code != 200:
                raise BackendError("bad_request", f"vLLM answered {response.status_code}: "
                                                  f"{response.text[:300]}")
            try:
                data: dict[str, Any] = response.json()
            except ValueError as exc:
                raise BackendError("bad_response", f"vLLM answered non-JSON: {exc}") from exc
            self.last_server_error = None
            return data
        assert last is not None
        raise last

    def _after_failure(self) -> str:
        if not self.last_server_error:
            return ""
        return f"; before that it failed with: {self.last_server_error}"

    async def _read_group(self, reads: list[LabelRead]) -> list[list[float]]:
        label_ids = reads[0].label_token_ids
        payload = {
            "model": self.model_name,
            "prompt": [r.prompt_token_ids for r in reads],
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": len(label_ids),
            "logprob_token_ids": label_ids,
            "return_tokens_as_token_ids": True,
        }
        data = await self._post_completions(payload)
        try:
            choices = sorted(data["choices"], key=lambda c: int(c.get("index", 0)))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BackendError("bad_response", f"vLLM answered without choices: {exc!r}") from exc
        if len(choices) != len(reads):
            raise BackendError("bad_response",
                               f"vLLM returned {len(choices)} choices for {len(reads)} prompts")
        results = []
        for choice in choices:
            try:
                top = choice["logprobs"]["top_logprobs"][0]
            except (KeyError, IndexError, TypeError) as exc:
                raise BackendError("bad_response",
                                   f"vLLM answered without logprobs ({exc!r})") from exc
            missing = [t for t in label_ids if f"token_id:{t}" not in top]
            if missing:
                # A server that predates logprob_token_ids ignores the field and returns its own
                # top tokens, which need not include the labels.
                raise BackendError(
                    "unsupported_server",
                    f"vLLM at {self.url} returned no logprob for label tokens {missing[:5]}: it "
                    f"ignored logprob_token_ids, which needs vLLM >= {MIN_VLLM}; upgrade the "
                    "server")
            try:
                results.append([float(top[f"token_id:{t}"]) for t in label_ids])
            except (TypeError, ValueError) as exc:
                raise BackendError("bad_response", f"vLLM answered a bad logprob: {exc!r}") from exc
        return results

    async def label_logprobs(self, reads: Sequence[LabelRead]) -> list[list[float]]:
        await self._ensure_checked()
        # One completions call per distinct label set; reads in a call share logprob_token_ids.
        groups: dict[tuple[int, ...], list[int]] = {}
        for position, read in enumerate(reads):
            groups.setdefault(tuple(read.label_token_ids), []).append(position)
        answers = await asyncio.gather(
            *(self._read_group([reads[p] for p in positions]) for positions in groups.values())
        )
        results: list[list[float]] = [[] for _ in reads]
        for positions, values in zip(groups.values(), answers, strict=True):
            for position, value in zip(positions, values, strict=True):
                results[position] = value
        return results

    def check_capacity(self, reads: int) -> None:
        """The server queues whatever it is sent; nothing is too large to queue here."""

    async def health(self) -> str | None:
        if self._mismatch is not None:
            return self._mismatch
        try:
            response = await self.client.get("/health", timeout=min(2.0, self.timeout_s))
        except httpx.HTTPError as exc:
            return f"vLLM at {self.url} is unreachable: {exc!r}{self._after_failure()}"
        if response.status_code != 200:
            # vLLM answers 503 once its engine is dead; the body (or the last 5xx) says why.
            body = response.text[:300].strip()
            return (f"vLLM at {self.url}/health answered {response.status_code}"
                    f"{': ' + body if body else ''}{self._after_failure()}")
        return None

    async def close(self) -> None:
        await self.client.aclose()
