"""The in-process reranker on OpenVINO's CPU runtime (``RANKD_RERANKER_BACKEND=openvino``).

Everything but the forward pass is the transformers backend's: the batcher and its passes,
fairness, budgets, prefix sharing, long prompts filled in chunks, the label reads. The model
is the same causal LM, converted once by ``openvino.convert_model`` into a graph that takes
the decoder's inputs and a KV cache, and returns the final hidden states at the positions
asked for and the new cache; ``OpenVinoCausalLM`` wraps that graph in the call that the
transformers backend makes of a model. The output layer stays in torch, in float32, over the
kept positions only (openvino-genai trims it the same way): label scores are differences of a
few logits, and a bf16 output layer rounds them (``float32_output_layer``).

The attention mask is built inside the graph as an additive float mask with finite minima, so
a left-padded row's pad positions read no NaN that the real positions could pick up (an
all-masked row under -inf is NaN, and 0 x NaN is NaN in the value product).

The converted graph is cached beside converted GGUF models (``RANKD_RERANKER_CACHE_DIR``,
default ``~/.cache/rankd/models``, in ``openvino-<key>``), keyed by the weights' digest and
OpenVINO's version, so only the first start converts.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

from reranker.backends.transformers_backend import (
    LoadedModel,
    TransformersBackend,
    attention_span,
)
from reranker.config import RerankerConfig
from reranker.errors import RerankerConfigError
from reranker.precision import DtypeChoice, choose_dtype
from runtime.paths import cache_root, staged_directory

log = logging.getLogger(__name__)

# Bumped when the converted graph's inputs or outputs change, so older caches are not read.
GRAPH_VERSION = "1"


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None)
               or config.hidden_size // config.num_attention_heads)


def _filled_cache(config: Any, keys: Any, values: Any) -> Any:
    """A DynamicCache holding ``keys`` and ``values`` (layers first). Its layers are set, not
    update()d: update's lazy start concatenates onto an empty 1-D tensor, which does not
    convert."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    layer: Any
    for index, layer in enumerate(cache.layers):
        layer.device = keys.device
        layer.keys, layer.values = keys[index], values[index]
        layer.is_initialized = True
    return cache


def _decoder_graph(model: Any) -> Any:
    """A torch module over ``model``'s decoder with the graph's signature, for tracing."""
    import torch

    layers = model.config.num_hidden_layers

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, keep: Any,
                    past_keys: Any, past_values: Any) -> tuple[Any, Any, Any]:
            cache = _filled_cache(self.model.config, past_keys, past_values)
            new = input_ids.shape[1]
            total = attention_mask.shape[1]
            query_at = torch.arange(new) + (total - new)
            causal = torch.arange(total)[None, :] <= query_at[:, None]
            allowed = causal[None] & attention_mask[:, None, :].bool()
            additive = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None]
            out = self.model.model(input_ids=input_ids, attention_mask=additive,
                                   position_ids=position_ids, cache=cache, use_cache=True)
            hidden = out.last_hidden_state.index_select(1, keep)
            present = out.cache
            return (hidden, torch.stack([present.layers[i].keys for i in range(layers)]),
                    torch.stack([present.layers[i].values for i in range(layers)]))

    return Decoder().eval()


def convert(model: Any) -> Any:
    """The OpenVINO graph of ``model``'s decoder, traced on a small padded example."""
    import openvino as ov
    import torch

    config = model.config
    layers, heads = config.num_hidden_layers, config.num_key_value_heads
    head_dim = _head_dim(config)
    rows, cached, new = 2, 3, 5
    mask = torch.ones((rows, cached + new), dtype=torch.long)
    mask[1, :2] = 0  # a left-padded row, so the traced graph reads the mask
    example = {"input_ids": torch.ones((rows, new), dtype=torch.long), "attention_mask": mask,
               "position_ids": (torch.arange(new) + cached).repeat(rows, 1),
               "keep": torch.tensor([new - 1]),
               "past_keys": torch.zeros((layers, rows, heads, cached, head_dim)),
               "past_values": torch.zeros((layers, rows, heads, cached, head_dim))}
    with torch.no_grad():
        return ov.convert_model(_decoder_graph(model), example_input=example)


def weights_key(model_dir: str) -> str:
    """A digest of a model directory's weight files and OpenVINO's version."""
    import openvino as ov

    digest = hashlib.sha256(f"{GRAPH_VERSION} {ov.__version__}".encode())
    files = sorted(Path(model_dir).glob("*.safetensors")) + sorted(Path(model_dir).glob("*.bin"))
    if not files:
        raise RerankerConfigError(
            f"the openvino reranker converts a local model directory with safetensors weights; "
            f"{model_dir!r} has none. Set RANKD_RERANKER_MODEL to such a directory, a .gguf file "
            "or the embedded default")
    for path in files:
        with path.open("rb") as stream:
            digest.update(hashlib.file_digest(stream, "sha256").digest())
    return digest.hexdigest()[:16]


class OpenVinoCausalLM:
    """A compiled OpenVINO decoder behind the call the transformers backend makes of a model:
    ``model(input_ids=, attention_mask=, position_ids=, use_cache=, logits_to_keep=, cache=)``,
    returning ``.logits`` and ``.cache`` (a DynamicCache), as transformers 5 names it."""

    def __init__(self, compiled: Any, config: Any, output_weight: Any,
                 output_bias: Any | None) -> None:
        self.config = config
        self._request = compiled.create_infer_request()
        self._layers = config.num_hidden_layers
        self._heads = config.num_key_value_heads
        self._head_dim = _head_dim(config)
        self._output_weight = output_weight  # float32, (vocab, hidden)
        self._output_bias = output_bias

    def get_output_embeddings(self) -> None:
        return None  # the output layer is computed here, in float32 already

    def _past(self, cache: Any, rows: int) -> tuple[Any, Any]:
        import torch

        layers = getattr(cache, "layers", None) or []
        if not layers or not getattr(layers[0], "is_initialized", False):
            empty = torch.zeros((self._layers, rows, self._heads, 0, self._head_dim))
            return empty, empty
        return (torch.stack([layer.keys for layer in layers]),
                torch.stack([layer.values for layer in layers]))

    def __call__(self, input_ids: Any, attention_mask: Any, position_ids: Any,
                 use_cache: bool = False, logits_to_keep: Any = 1, cache: Any = None) -> Any:
        import torch
        from transformers.modeling_outputs import CausalLMOutputWithPast

        rows, new = input_ids.shape
        keep = (torch.arange(new - logits_to_keep, new) if isinstance(logits_to_keep, int)
                else logits_to_keep)
        past_keys, past_values = self._past(cache, rows)
        self._request.infer({"input_ids": input_ids.numpy(),
                             "attention_mask": attention_mask.numpy(),
                             "position_ids": position_ids.numpy(), "keep": keep.numpy(),
                             "past_keys": past_keys.numpy(), "past_values": past_values.numpy()})
        # The request's outputs are overwritten by its next call: copy what is kept.
        hidden = torch.from_numpy(self._request.get_output_tensor(0).data.copy())
        logits = torch.nn.functional.linear(hidden.float(), self._output_weight,
                                            self._output_bias)
        present = None
        if use_cache:
            present = _filled_cache(
                self.config, torch.from_numpy(self._request.get_output_tensor(1).data.copy()),
                torch.from_numpy(self._request.get_output_tensor(2).data.copy()))
        return CausalLMOutputWithPast(logits=logits, cache=present)

    forward = __call__


def _hint(dtype: DtypeChoice) -> str:
    if dtype.name == "float16":
        raise RerankerConfigError("the openvino reranker computes in float32 or bfloat16; set "
                                  "RANKD_RERANKER_DTYPE to auto, float32 or bfloat16")
    return "bf16" if dtype.name == "bfloat16" else "f32"


class OpenVinoBackend(TransformersBackend):
    """The transformers backend with its forward passes on OpenVINO's CPU runtime."""

    name = "openvino"

    @classmethod
    def load(cls, config: RerankerConfig, tokenizer: Any) -> LoadedModel:
        try:
            import openvino as ov
        except ImportError as exc:
            raise RerankerConfigError(
                "RANKD_RERANKER_BACKEND=openvino needs OpenVINO: `pip install 'rankd[openvino]'`"
                ", or set RANKD_RERANKER_BACKEND=transformers") from exc
        if config.device not in ("auto", "cpu") or config.quantization != "none":
            raise RerankerConfigError(
                "the openvino reranker runs on the CPU from the model's own weights; set "
                "RANKD_RERANKER_DEVICE=cpu (or auto) and RANKD_RERANKER_QUANTIZATION=none")
        dtype = choose_dtype(config.dtype, "cpu")
        hint = _hint(dtype)
        # The torch model in float32: the source of the graph, and of the output layer kept.
        source = config.model_copy(update={"dtype": "float32", "device": "cpu"})
        loaded = TransformersBackend.load(source, tokenizer)
        model = loaded.model
        assert config.model
        key = weights_key(config.model)
        graph = (config.cache_dir or cache_root() / "models") / f"openvino-{key}" / "decoder.xml"
        started = time.perf_counter()
        if graph.is_file():
            converted = ov.Core().read_model(graph)
        else:
            converted = convert(model)
            # The graph and its weights appear together, in one rename of their directory:
            # a start beside this one either reads both or converts its own. A directory there
            # without the graph is what an older, interrupted conversion left: replaced.
            with staged_directory(graph.parent, replace=graph.parent.exists(),
                                  finished=lambda d: (d / graph.name).is_file()) as staging:
                ov.save_model(converted, staging / graph.name, compress_to_fp16=False)
        threads = config.threads or _torch_threads()
        compiled = ov.Core().compile_model(converted, "CPU", {
            "INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY"})
        head = model.get_output_embeddings()
        bias = getattr(head, "bias", None)
        adapted = OpenVinoCausalLM(compiled, model.config, head.weight.detach().float(),
                                   None if bias is None else bias.detach().float())
        log.info("openvino reranker %s ready in %.1fs (%s, %d threads; graph %s)", config.model,
                 time.perf_counter() - started, hint, threads, graph)
        return LoadedModel(adapted, "cpu", loaded.pad_token_id,
                           DtypeChoice(dtype.name, f"openvino {hint}: {dtype.reason}"),
                           span=attention_span(model))


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()
