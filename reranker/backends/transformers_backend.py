"""In-process scoring with a transformers causal LM: left-padded batched forward passes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from rankd.batching import BatcherClosedError, BatchObserver, MicroBatcher, default_memory_release
from reranker.backends.base import LabelRead
from reranker.config import RerankerConfig
from reranker.errors import BackendError, RerankerConfigError

log = logging.getLogger(__name__)


def _torch_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        # float32 on CPU keeps scores exact; half precision is the norm on GPUs.
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "float16": torch.float16,
                "bfloat16": torch.bfloat16}[name]
    except KeyError:
        raise RerankerConfigError(
            f"unknown dtype {name!r}; set RANKD_RERANKER_DTYPE to auto, float32, float16 or bfloat16"
        ) from None


class TransformersBackend:
    name = "transformers"

    def __init__(self, model: Any, pad_token_id: int, device: str, config: RerankerConfig,
                 observer: BatchObserver | None = None) -> None:
        self.model = model
        self.threads = config.threads
        self.pad_token_id = pad_token_id
        self.device = device
        self.timeout_s = config.timeout_s
        # Concurrent requests share forward passes; the batch runs on the batcher's own thread.
        self._batcher: MicroBatcher[LabelRead, list[float]] = MicroBatcher(
            "rerank", self.score_batch, max_batch_size=config.batch_size,
            max_wait_ms=config.batch_wait_ms, max_queue_depth=config.max_queue_depth,
            observer=observer, memory_release=default_memory_release())
        self.forward_passes = 0

    @classmethod
    async def create(cls, config: RerankerConfig, tokenizer: Any,
                     observer: BatchObserver | None = None) -> TransformersBackend:
        model, device, pad = await asyncio.to_thread(cls.load, config, tokenizer)
        return cls(model, pad, device, config, observer)

    @classmethod
    def load(cls, config: RerankerConfig, tokenizer: Any) -> tuple[Any, str, int]:
        """The model on its device, the device, and the pad token id."""
        import torch
        from transformers import AutoModelForCausalLM

        assert config.model, "RerankerConfig requires a model"
        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            model: Any = AutoModelForCausalLM.from_pretrained(
                config.model, dtype=_torch_dtype(config.dtype, device)
            )
        except (OSError, ValueError) as exc:
            raise RerankerConfigError(
                f"cannot load the reranker model {config.model!r}: {exc}. Set "
                "RANKD_RERANKER_MODEL to a local model directory, a .gguf file or a reachable "
                "hub id, or RANKD_RERANKER_BACKEND=none to serve retrieval only"
            ) from exc
        model.to(device).eval()
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        log.info("transformers reranker %s loaded on %s (%s)", config.model, device, model.dtype)
        return model, device, int(pad)

    def score_batch(self, reads: list[LabelRead]) -> list[list[float]]:
        """One left-padded forward pass over ``reads``; label log-softmax at the last position."""
        import torch

        if self.threads:
            # Per call, in this worker thread: OpenMP's thread count is a per-thread setting, so
            # the embedder's worker keeps its own.
            torch.set_num_threads(self.threads)
        width = max(len(r.prompt_token_ids) for r in reads)
        input_ids = torch.full((len(reads), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(reads), width), dtype=torch.long)
        for row, read in enumerate(reads):
            n = len(read.prompt_token_ids)
            input_ids[row, width - n:] = torch.tensor(read.prompt_token_ids, dtype=torch.long)
            attention[row, width - n:] = 1
        # Left padding shifts positions; count them from each row's first real token instead.
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            out = self.model(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                position_ids=positions.to(self.device),
                logits_to_keep=1,
            )
        self.forward_passes += 1
        last = out.logits[:, -1, :].float()
        results = []
        for row, read in enumerate(reads):
            label_logits = last[row, torch.tensor(read.label_token_ids, device=last.device)]
            results.append(torch.log_softmax(label_logits, dim=-1).tolist())
        return results

    async def start(self) -> None:
        await self._batcher.start()

    async def label_logprobs(self, reads: Sequence[LabelRead]) -> list[list[float]]:
        try:
            return await asyncio.wait_for(self._batcher.submit_many(reads), self.timeout_s)
        except TimeoutError:
            raise BackendError("timeout", f"transformers reranker took over {self.timeout_s}s") from None
        # Overload (the batcher's queue-full error) is not one of these and reaches the caller.
        except BatcherClosedError:
            raise BackendError("not_started", "the transformers reranker is not running") from None
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            raise BackendError("model_error", f"transformers reranker failed: {exc}") from exc

    async def health(self) -> str | None:
        return None

    async def close(self) -> None:
        await self._batcher.close()
