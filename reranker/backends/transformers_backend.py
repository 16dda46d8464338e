"""In-process scoring with a transformers causal LM: left-padded batched forward passes."""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from reranker.backends.base import LabelRead
from reranker.config import RerankerConfig
from reranker.errors import BackendError, OverBudgetError, RerankerConfigError
from reranker.models import declared_context_length
from reranker.precision import DtypeChoice, choose_dtype
from runtime.batching import (
    UNFINISHED,
    BatcherClosedError,
    BatchObserver,
    MicroBatcher,
    Unfinished,
    default_memory_release,
)
from runtime.paths import select_device

log = logging.getLogger(__name__)


def quantize_int8(model: Any, device: str) -> Any:
    """Dynamic int8 quantization of every Linear layer but the output one (torch's fbgemm/oneDNN
    kernels): int8 weights, activations quantized per batch. The output layer stays float32:
    with one position kept it costs little, and the label logits come from it."""
    import torch
    from torch.ao.quantization import quantize_dynamic

    if device != "cpu" or next(model.parameters()).dtype != torch.float32:
        raise RerankerConfigError(
            "RANKD_RERANKER_QUANTIZATION=int8 runs on CPU from float32 weights; set "
            "RANKD_RERANKER_DEVICE=cpu and RANKD_RERANKER_DTYPE=float32 (or auto), or "
            "quantization none")
    output = model.get_output_embeddings()
    with warnings.catch_warnings():
        # torch >= 2.10 marks its quantized tensor types deprecated; the kernels still run.
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated")
        for name, child in list(model.named_children()):
            if child is not output:
                setattr(model, name, quantize_dynamic(child, {torch.nn.Linear},
                                                      dtype=torch.qint8))
    log.info("reranker quantized: int8 dynamic Linear layers (output layer float32)")
    return model


def float32_output_layer(model: Any) -> None:
    """Compute the output layer in float32 whatever dtype the rest of the model runs in.

    Label scores are differences of two or a few logits. A bfloat16 output layer rounds each
    logit to its 8-bit mantissa: near 20, to steps of 0.125, so a pointwise yes/no
    probability could take only a handful of values and 27% of Eedi queries' top scores
    were ties (measured on a trained SmolLM2, bf16 on avx512_bf16). Recomputing the kept
    positions' logits from the last hidden state in float32 costs a multiply by the output
    weights per prompt; the frozen weights are converted once (``(vocab x hidden) x 4``
    bytes: 113 MB for SmolLM2-135M), trainable ones on every pass so their gradient flows.
    Installed as a forward hook, so the saved model is unchanged."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if weight is None or getattr(head, "rankd_float32", False):
        return
    frozen: dict[str, Any] = {}

    def float32_weights(module: Any) -> tuple[Any, Any]:
        w, b = module.weight, getattr(module, "bias", None)
        if w.requires_grad or w.dtype == torch.float32:
            return w.float(), None if b is None else b.float()
        key = (w.data_ptr(), w._version, w.device)
        if frozen.get("key") != key:
            frozen.update(key=key, weight=w.detach().float(),
                          bias=None if b is None else b.detach().float())
        return frozen["weight"], frozen["bias"]

    def hook(module: Any, args: tuple[Any, ...], output: Any) -> Any:
        if output.dtype == torch.float32:
            return None  # computed in float32 already
        w, b = float32_weights(module)
        with torch.autocast(args[0].device.type, enabled=False):
            return torch.nn.functional.linear(args[0].float(), w, b)

    head.register_forward_hook(hook)
    head.rankd_float32 = True


def last_logits(model: Any, prompts: Sequence[Sequence[int]], pad_token_id: int,
                device: str) -> Any:
    """One left-padded forward pass over whole prompts; the logits at each last position.
    Serving runs it under inference mode, and training (reranker/training/examples.py) with gradients."""
    import torch

    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        attention[row, width - len(prompt):] = 1
    # Left padding shifts positions; count them from each row's first real token instead.
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                position_ids=positions.to(device), logits_to_keep=1)
    return out.logits[:, -1, :].float()


def label_log_softmax(last: Any, reads: Sequence[LabelRead]) -> list[Any]:
    """Each read's log-softmax over its own label tokens at its last position: the label
    distribution that serving renormalises to, and the one training's cross-entropy is over."""
    import torch

    return [torch.log_softmax(last[row, torch.tensor(read.label_token_ids, device=last.device)],
                              dim=-1)
            for row, read in enumerate(reads)]


# A common prefix shorter than this is not worth a group of its own.
MIN_SHARED_TOKENS = 16


def shared_prefix_groups(prompts: Sequence[Sequence[int]]) -> list[tuple[int, list[int]]]:
    """Groups of prompts that begin alike: (prefix length, member indices) each.

    Prompts are sorted, so those with a common beginning sit side by side; a run whose common
    prefix is at least MIN_SHARED_TOKENS long is one group, unless a prompt would cut the
    group's prefix by more than its joining saves (then it starts the next group). Every prompt
    keeps at least its last token out of the prefix, because its logits come from the suffix
    pass.
    """
    order = sorted(range(len(prompts)), key=lambda i: list(prompts[i]))
    groups: list[tuple[int, list[int]]] = []
    for i in order:
        if groups:
            length, members = groups[-1]
            head = prompts[members[0]]
            shared = _common_prefix(head, prompts[i], length)
            shared = min(shared, len(prompts[i]) - 1)
            # Joining cuts the group's prefix to what the newcomer shares: worth it only while
            # the group saves no fewer tokens. A query's prompts share its instruction and query;
            # a prompt of the next query shares the instruction alone, and joining would cost
            # every prompt of the first its query, so it starts a group of its own.
            saved_before = length * (len(members) - 1) if len(members) > 1 else 0
            if shared >= MIN_SHARED_TOKENS and shared * len(members) >= saved_before:
                groups[-1] = (shared, [*members, i])
                continue
        groups.append((len(prompts[i]) - 1, [i]))
    return groups


# Share a group's prefix when it saves at least this share of the group's prompt tokens: the
# suffix pass attends through an explicit mask, which costs more per token than the plain pass,
# so a short prefix shared by long prompts (1,000 documents in 26-item windows) is not worth it.
MIN_SAVED_SHARE = 0.15


def _sharing_pays(group: tuple[int, list[int]], reads: Sequence[LabelRead]) -> bool:
    length, members = group
    if len(members) < 2:
        return False
    total = sum(len(reads[i].prompt_token_ids) for i in members)
    return length * (len(members) - 1) >= MIN_SAVED_SHARE * total


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    for j in range(n):
        if a[j] != b[j]:
            return j
    return n


@dataclass
class _InProgress:
    """A read on its way through the model: how many of its tokens the cache holds, and how
    many it shares with the read before it in its request (the other order of the same query),
    which prefix sharing computes once when the two run together."""

    read: LabelRead
    shared: int = 0
    done: int = 0
    cache: Any = None

    @property
    def remaining(self) -> int:
        return len(self.read.prompt_token_ids) - self.done



@dataclass(frozen=True)
class LoadedModel:
    """A causal LM ready to score: on its device, in its dtype, with the pad token to use."""

    model: Any
    device: str
    pad_token_id: int
    dtype: DtypeChoice
    # Run every pass under autocast to ``dtype``: a model in training, whose frozen weights
    # are bfloat16 and trainable ones float32 master weights (reranker/training/fit.py).
    autocast: bool = False
    # attention_span of the model, where ``model`` is not a torch module to count it from (a
    # compiled graph: reranker/backends/openvino_backend.py).
    span: float | None = None


def attention_span(model: Any) -> float:
    """How many cached tokens a new token must attend to before attention costs it as much as
    the rest of its pass: the linear layers' multiply-adds per token over attention's per
    (token, cached token) pair, from the model's size (about 3,000 for SmolLM2-135M)."""
    config = model.config
    embeddings = sum(p.numel() for p in model.get_input_embeddings().parameters())
    linear = sum(p.numel() for p in model.parameters()) - embeddings
    return linear / (2 * config.hidden_size * config.num_hidden_layers)


def pass_cost(new: int, cached: int, span: float) -> float:
    """A forward pass over ``new`` tokens after ``cached`` ones, in tokens of a pass with no
    context: attention grows with the context each new token reads."""
    return new * (1 + (cached + new / 2) / span)


def chunk_for(cached: int, budget: float, span: float) -> int:
    """The most new tokens whose pass after ``cached`` tokens costs at most ``budget``."""
    a = 1 / (2 * span)
    b = 1 + cached / span
    return max(16, int((-b + math.sqrt(b * b + 4 * a * budget)) / (2 * a)))


class TransformersBackend:
    name = "transformers"

    def __init__(self, loaded: LoadedModel, config: RerankerConfig,
                 observer: BatchObserver | None = None) -> None:
        self.model = loaded.model
        float32_output_layer(self.model)
        self.threads = config.threads
        self.pad_token_id = loaded.pad_token_id
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.autocast = loaded.autocast
        self.span = loaded.span if loaded.span is not None else attention_span(self.model)
        self.detail = f"{loaded.device} in {loaded.dtype}"
        self.context_length = declared_context_length(self.model.config)
        self.timeout_s = config.timeout_s
        # Concurrent requests share forward passes; the batch runs on the batcher's own thread.
        # Batches hold at most batch_tokens prompt tokens, shortest request first, and a longer
        # prompt is filled a chunk per turn: no request holds the model for longer than that.
        self.batch_tokens = config.batch_tokens
        self._batcher: MicroBatcher[_InProgress, list[float]] = MicroBatcher(
            "rerank", self._step, max_batch_size=config.batch_size,
            max_wait_ms=config.batch_wait_ms, max_queue_depth=config.max_queue_depth,
            cost=self._cost, shared_cost=self._shared_cost, turn_cost=self._turn_cost,
            max_batch_cost=config.batch_tokens,
            observer=observer, memory_release=default_memory_release())
        self.forward_passes = 0  # model calls
        self.batches = 0  # micro-batches scored
        self.prefix_sharing = config.prefix_sharing
        # transformers 5.x names the KV cache `cache` (in and out); earlier, `past_key_values`.
        # A peft model's forward passes it on under the base model's name.
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        parameters = inspect.signature(base.forward).parameters
        self._cache_arg = "cache" if "cache" in parameters else "past_key_values"

    @classmethod
    async def create(cls, config: RerankerConfig, tokenizer: Any,
                     observer: BatchObserver | None = None) -> TransformersBackend:
        loaded = await asyncio.to_thread(cls.load, config, tokenizer)
        return cls(loaded, config, observer)

    @classmethod
    def load(cls, config: RerankerConfig, tokenizer: Any) -> LoadedModel:
        """The model on its device, in the dtype that ``config.dtype`` chooses there."""
        from transformers import AutoModelForCausalLM

        assert config.model, "RerankerConfig requires a model"
        device = select_device(config.device)
        dtype = (DtypeChoice("float32", "auto: int8 quantization starts from float32 weights")
                 if config.quantization == "int8" and config.dtype == "auto"
                 else choose_dtype(config.dtype, device))
        try:
            model: Any = AutoModelForCausalLM.from_pretrained(config.model,
                                                              dtype=dtype.torch_dtype())
        except (OSError, ValueError) as exc:
            raise RerankerConfigError(
                f"cannot load the reranker model {config.model!r}: {exc}. Set "
                "RANKD_RERANKER_MODEL to a local model directory, a .gguf file or a reachable "
                "hub id, or RANKD_RERANKER_BACKEND=none to serve retrieval only"
            ) from exc
        model.to(device).eval()
        if config.quantization == "int8":
            model = quantize_int8(model, device)
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        log.info("transformers reranker %s loaded on %s in %s", config.model, device, dtype)
        return LoadedModel(model, device, int(pad), dtype)

    def _autocast(self) -> Any:
        """Autocast to the model's dtype where it is set (per thread: the batcher's passes run
        on its own thread, so the caller's autocast would not reach them)."""
        import contextlib

        import torch

        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.split(":")[0], dtype=getattr(torch, self.dtype.name))

    def score_batch(self, reads: list[LabelRead]) -> list[list[float]]:
        """Label log-softmax at the next position of each read, for a micro-batch of reads."""
        import torch

        self.batches += 1
        with torch.inference_mode(), self._autocast():
            last = self.last_logits(reads)
        return [row.tolist() for row in label_log_softmax(last, reads)]

    def _cost(self, item: _InProgress) -> int:
        """The work a read has left, in context-free tokens."""
        return round(pass_cost(item.remaining, item.done, self.span))

    def _runs_whole(self, item: _InProgress) -> bool:
        return item.cache is None and pass_cost(item.remaining, 0, self.span) <= self.batch_tokens

    def _turn_cost(self, item: _InProgress) -> int:
        """The work a read does in one pass: all of it when it runs whole, else one chunk of
        half a pass (the whole pass when it runs alone), so that a long read the batcher
        serves first for its deadline leaves the other half to the shortest requests."""
        return self._cost(item) if self._runs_whole(item) else self.batch_tokens // 2

    def _shared_cost(self, item: _InProgress) -> int:
        """The part of it that prefix sharing computes once when the read runs in one batch
        with the read before it in its request (the other order of its query, or the query's
        previous pointwise prompt)."""
        # A read filled in chunks runs over its own cache, not beside its partner.
        return round(pass_cost(item.shared, 0, self.span)) if self._runs_whole(item) else 0

    def _step(self, items: list[_InProgress]) -> list[list[float] | Unfinished]:
        """One turn of the batcher: the reads that fit whole are scored together; a read in
        progress (longer than batch_tokens) advances by one chunk, and is scored with its
        last."""
        import torch

        if self.threads:
            # Per call, in this worker thread: OpenMP's thread count is a per-thread setting, so
            # the embedder's worker keeps its own.
            torch.set_num_threads(self.threads)
        whole = [i for i, item in enumerate(items) if self._runs_whole(item)]
        results: list[list[float] | Unfinished] = [UNFINISHED] * len(items)
        if whole:
            for i, row in zip(whole, self.score_batch([items[i].read for i in whole]),
                              strict=True):
                results[i] = row
        # A long read alone in its pass takes all of it; beside others, the half it was
        # counted for (``_turn_cost``).
        budget = self.batch_tokens if len(items) == 1 else self.batch_tokens / 2
        for i, item in enumerate(items):
            if i not in whole:
                results[i] = self._advance(item, budget)
        return results

    def _advance(self, item: _InProgress, budget: float) -> list[float] | Unfinished:
        """Run the next chunk of a long read over its cached keys and values; its label
        log-softmax once the last chunk has run."""
        import torch
        from transformers import DynamicCache

        tokens = item.read.prompt_token_ids
        # As many tokens as ``budget`` affords at this depth of context.
        end = min(len(tokens), item.done + chunk_for(item.done, budget, self.span))
        chunk = torch.tensor([tokens[item.done:end]], dtype=torch.long, device=self.device)
        if item.cache is None:
            item.cache = DynamicCache()
        with torch.inference_mode(), self._autocast():
            out = self.model(input_ids=chunk,
                             attention_mask=torch.ones((1, end), dtype=torch.long,
                                                       device=self.device),
                             position_ids=torch.arange(item.done, end,
                                                       device=self.device).unsqueeze(0),
                             use_cache=True, logits_to_keep=1, **{self._cache_arg: item.cache})
        self.forward_passes += 1
        item.cache = getattr(out, self._cache_arg)
        item.done = end
        if end < len(tokens):
            return UNFINISHED
        item.cache = None
        last = out.logits[:, -1, :].float()
        return label_log_softmax(last, [item.read])[0].tolist()

    def last_logits(self, reads: Sequence[LabelRead]) -> Any:
        """The logits at each read's last position: serving runs it under inference mode, and
        training (reranker/training/examples.py) with gradients, so both read the model the same way."""
        return self._last_logits_shared(reads) if self.prefix_sharing \
            else self._last_logits(reads)

    def _last_logits(self, reads: Sequence[LabelRead]) -> Any:
        self.forward_passes += 1
        return last_logits(self.model, [r.prompt_token_ids for r in reads], self.pad_token_id,
                           self.device)

    def _last_logits_shared(self, reads: Sequence[LabelRead]) -> Any:
        """The same logits, computing each shared prefix once.

        The orders of one query (and any reads that begin alike) share their instruction and
        query. Reads are grouped by common prefix; groups whose prefix saves little run whole in
        one ordinary pass, and the others go through ``_prefix_then_suffix``.
        """
        import torch

        groups = shared_prefix_groups([r.prompt_token_ids for r in reads])
        pays = [_sharing_pays(g, reads) for g in groups]
        alone = [i for g, shared in zip(groups, pays, strict=True) if not shared for i in g[1]]
        worth = [g for g, shared in zip(groups, pays, strict=True) if shared]
        rows: dict[int, Any] = {}
        if alone:
            rows.update(zip(alone, self._last_logits([reads[i] for i in alone]), strict=True))
        if worth:
            members = [i for _, group in worth for i in group]
            local = {i: j for j, i in enumerate(members)}
            rows.update(zip(members, self._prefix_then_suffix(
                [reads[i] for i in members],
                [(length, [local[i] for i in group]) for length, group in worth]), strict=True))
        return torch.stack([rows[i] for i in range(len(reads))])

    def _prefix_then_suffix(self, reads: Sequence[LabelRead],
                            groups: Sequence[tuple[int, list[int]]]) -> Any:
        """One left-padded pass runs each group's prefix once and keeps its KV cache; a second
        pass runs every read's own suffix, right-padded, over its group's cached prefix."""
        import torch

        prefixes = [reads[members[0]].prompt_token_ids[:length] for length, members in groups]
        width = max(len(p) for p in prefixes)
        prefix_ids = torch.full((len(groups), width), self.pad_token_id, dtype=torch.long)
        prefix_mask = torch.zeros((len(groups), width), dtype=torch.long)
        for row, prefix in enumerate(prefixes):
            prefix_ids[row, width - len(prefix):] = torch.tensor(prefix, dtype=torch.long)
            prefix_mask[row, width - len(prefix):] = 1
        out = self.model(input_ids=prefix_ids.to(self.device),
                         attention_mask=prefix_mask.to(self.device),
                         position_ids=(prefix_mask.cumsum(-1) - 1).clamp(min=0).to(self.device),
                         use_cache=True, logits_to_keep=1)
        cache = getattr(out, self._cache_arg)
        group_of = [0] * len(reads)
        prefix_len = [0] * len(reads)
        for g, (length, members) in enumerate(groups):
            for i in members:
                group_of[i], prefix_len[i] = g, length
        suffixes = [r.prompt_token_ids[prefix_len[i]:] for i, r in enumerate(reads)]
        longest = max(len(x) for x in suffixes)
        suffix_ids = torch.full((len(reads), longest), self.pad_token_id, dtype=torch.long)
        suffix_mask = torch.zeros((len(reads), longest), dtype=torch.long)
        positions = torch.zeros((len(reads), longest), dtype=torch.long)
        for row, suffix in enumerate(suffixes):
            suffix_ids[row, :len(suffix)] = torch.tensor(suffix, dtype=torch.long)
            suffix_mask[row, :len(suffix)] = 1
            positions[row] = prefix_len[row] + torch.arange(longest)
        # Each read gets its group's prefix: the cache rows, reordered like beams.
        cache.reorder_cache(torch.tensor(group_of, device=self.device))
        mask = torch.cat([prefix_mask[group_of], suffix_mask], dim=1)
        # Right padding: a read's pads come after its last token, which never attends to them.
        # Logits only where some read ends: the output layer over every suffix position would
        # cost more than the rest of the pass for a small model with a large vocabulary.
        ends = [len(x) - 1 for x in suffixes]
        kept = sorted(set(ends))
        out = self.model(input_ids=suffix_ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=positions.to(self.device), use_cache=True,
                         logits_to_keep=torch.tensor(kept, device=self.device),
                         **{self._cache_arg: cache})
        self.forward_passes += 2
        column = torch.tensor([kept.index(e) for e in ends], device=out.logits.device)
        return out.logits[torch.arange(len(reads), device=column.device), column].float()

    async def start(self) -> None:
        await self._batcher.start()

    def check_capacity(self, reads: int) -> None:
        """JobTooLargeError when a request of ``reads`` prompts could never be queued."""
        self._batcher.check_capacity(reads)

    async def label_logprobs(self, reads: Sequence[LabelRead]) -> list[list[float]]:
        items = [_InProgress(r, _common_prefix(r.prompt_token_ids, reads[i - 1].prompt_token_ids,
                                               len(r.prompt_token_ids) - 1) if i else 0)
                 for i, r in enumerate(reads)]
        # Admission by predicted cost: work that would run past the budget alone is refused
        # before it holds the model, instead of timing out after it did.
        predicted = self._batcher.predicted_seconds(items)
        if predicted is not None and predicted > self.timeout_s:
            raise OverBudgetError(predicted, self.timeout_s)
        try:
            return await asyncio.wait_for(self._batcher.submit_many(items), self.timeout_s)
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
