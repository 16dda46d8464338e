"""Fitting: transformers' Trainer over serving's forward pass, full fine-tuning (optionally of
the top layers only) or LoRA through peft (merged into the weights when saved).

The Trainer brings its optimizer and schedule, gradient accumulation, progress bar and
checkpoints under ``output/checkpoints``. Mixed precision follows the dtype serving chooses
(``reranker.precision.choose_dtype``): where it is bfloat16 (a GPU with bf16, a CPU with
AMX-BF16 or AVX512-BF16), the forward and backward passes run under bfloat16 autocast over
float32 master weights; elsewhere (an AVX2-only CPU, where bf16 is emulated and slower) float32.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reranker.backends.transformers_backend import LoadedModel, TransformersBackend
from reranker.precision import DtypeChoice
from reranker.trained import write_served_settings
from reranker.training.config import CHECKPOINT_DIR, RerankerTrainingConfig, TuningMethod
from reranker.training.examples import Example, example_loss

log = logging.getLogger(__name__)




def lora(model: Any, config: RerankerTrainingConfig) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model

    layers = model.config.num_hidden_layers
    chosen = (list(range(max(0, layers - config.lora_layers), layers)) if config.lora_layers
              else None)
    # peft takes "all-linear" only for every layer; for some layers, the decoder's own Linear
    # names (q_proj, ..., down_proj), the output layer left out.
    output = model.get_output_embeddings()
    targets: str | list[str] = "all-linear" if chosen is None else sorted({
        name.rsplit(".", 1)[-1] for name, module in model.get_decoder().named_modules()
        if isinstance(module, torch.nn.Linear) and module is not output})
    settings = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                      target_modules=targets, layers_to_transform=chosen,
                      task_type="CAUSAL_LM")
    return get_peft_model(model, settings)


def freeze_below(model: Any, layers: int) -> None:
    """Train only the last ``layers`` decoder layers and the final norm; the embeddings (and an
    output layer tied to them) and every layer below stay as they are."""
    decoder = model.get_decoder()
    for parameter in model.parameters():
        parameter.requires_grad = False
    for module in [*list(decoder.layers)[-layers:], decoder.norm]:
        for parameter in module.parameters():
            parameter.requires_grad = True


def trainable(model: Any) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def _collate(batch: Sequence[Example]) -> dict[str, Any]:
    return {"examples": list(batch)}


@dataclass
class Fitted:
    model: Any  # the trained model (a peft model for LoRA)
    steps: int
    loss: list[dict[str, float]]
    train_seconds: float
    curve_seconds: float


def fit(model: Any, examples: list[Example], config: RerankerTrainingConfig, device: str,
        pad_token_id: int, output: Path, precision: DtypeChoice,
        evaluate: Callable[[int, int], str]) -> Fitted:
    """Train with transformers' Trainer in ``precision`` (bfloat16: autocast over float32
    weights); ``evaluate(step, examples)`` runs at each learning-curve point and says what it
    found, for the log."""
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    mixed = precision.name != "float32"
    if mixed:
        # Frozen weights never change: kept in the compute dtype, autocast need not cast them
        # again on every pass, which costs more than the pass itself for a small model's short
        # prompts on CPU (measured in docs/fine-tuning.md). Trainable ones stay float32 masters.
        for parameter in model.parameters():
            if not parameter.requires_grad:
                parameter.data = parameter.data.to(precision.torch_dtype())
    forward = TransformersBackend(LoadedModel(model, device, pad_token_id, precision,
                                              autocast=mixed), config.reranker)
    per_step = config.batch_size * config.gradient_accumulation
    total_steps = max(1, round(max(1, -(-len(examples) // per_step)) * config.epochs))
    curve_steps = sorted({max(1, round(total_steps * (i + 1) / (config.curve_points + 1)))
                          for i in range(config.curve_points)} - {total_steps})
    curve_seconds = 0.0

    class Curve(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            nonlocal curve_seconds
            if state.global_step in curve_steps:
                started = time.perf_counter()
                seen = min(state.global_step * per_step, round(len(examples) * config.epochs))
                found = evaluate(state.global_step, seen)
                curve_seconds += time.perf_counter() - started
                log.info("step %d (%d examples): %s", state.global_step, seen, found)

    class RerankTrainer(Trainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # The loss is a mean over the batch; the Trainer averages over accumulation.
            self.model_accepts_loss_kwargs = False

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            loss = example_loss(forward, inputs["examples"], config.scoring)
            return (loss, None) if return_outputs else loss

    on_gpu = device.startswith("cuda")
    args = TrainingArguments(
        output_dir=str(output / CHECKPOINT_DIR),
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_ratio,  # a float below 1 is a ratio of the total steps
        lr_scheduler_type="linear",
        seed=config.seed,
        data_seed=config.seed,
        save_strategy="steps",
        save_steps=max(1, min(curve_steps or [total_steps])),
        save_total_limit=config.save_total_limit,
        save_only_model=True,
        logging_steps=max(1, total_steps // 20),
        disable_tqdm=not config.progress,
        report_to="none",
        use_cpu=not on_gpu,
        bf16=precision.name == "bfloat16",
        fp16=precision.name == "float16",
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    trainer = RerankTrainer(model=model, args=args, train_dataset=examples,
                            data_collator=_collate, callbacks=[Curve()])
    # Without progress bars the Trainer prints its log lines to stdout, which is the command's
    # JSON summary; the loss is in the report either way.
    trainer.remove_callback(PrinterCallback)
    started = time.perf_counter()
    trainer.train()
    loss = [{"step": e["step"], "loss": round(e["loss"], 4)}
            for e in trainer.state.log_history if "loss" in e]
    return Fitted(model, trainer.state.global_step, loss,
                  time.perf_counter() - started - curve_seconds, curve_seconds)



def save_model(fitted: Fitted, tokenizer: Any, config: RerankerTrainingConfig,
               output: Path, served: dict[str, Any]) -> None:
    """The merged model, written as RANKD_RERANKER_MODEL, vLLM and `rankd quantize` load it,
    with the settings it is served with (``reranker.trained``)."""
    model = fitted.model
    merged = model.merge_and_unload() if config.method is TuningMethod.LORA else model
    merged.save_pretrained(str(output), safe_serialization=True)
    tokenizer.save_pretrained(str(output))
    write_served_settings(output, served)
