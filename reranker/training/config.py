"""The options of one `rankd train-reranker` run, and its vocabulary."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from reranker.config import RerankerConfig, Scoring
from retriever.config import RetrieverSettings
from retriever.embedder import DEFAULT_EMBEDDER

CHECKPOINT_DIR = "checkpoints"
# The written model's scores of the reported queries (bench/fusion_sweep.py): validation's
# when the run has no test split, else the test questions' (never read by a choice).
SCORES_FILE = "validation_scores.jsonl"
TEST_SCORES_FILE = "test_scores.jsonl"
# The scores of the validation queries the fusion was chosen on, in the same form.
FUSION_SCORES_FILE = "fusion_scores.jsonl"


class RerankerTrainingError(ValueError):
    """The data or options cannot be used as given."""


class MissingPositive(StrEnum):
    INSERT = "insert"  # the positive takes the last candidate's place
    SKIP = "skip"  # the example is left out


class TuningMethod(StrEnum):
    LORA = "lora"
    FULL = "full"


class ExampleOrders(StrEnum):
    """Listwise: the orders each example is shown in (the candidate order, then reversed)."""

    BOTH = "both"  # both, as served: twice the prompts
    FORWARD = "forward"  # the candidate order only
    ALTERNATE = "alternate"  # one of the two per example, taking turns: half the prompts


class CandidateOrder(StrEnum):
    RETRIEVAL = "retrieval"  # as the retriever ranked them, as serving shows them
    SHUFFLED = "shuffled"  # a seeded random order per example


# The recipe's scoring mode: pointwise beat listwise under the fusion each is served with
# (docs/fine-tuning.md).
RECIPE_SCORING = Scoring.POINTWISE


def _recipe_reranker() -> RerankerConfig:
    return RerankerConfig(scoring=RECIPE_SCORING)


@dataclass(frozen=True)
class RerankerTrainingConfig:
    """Options of one run; the scoring mode is the served one, ``reranker.scoring``, and the
    dtype the served one, ``reranker.dtype`` (auto: bfloat16 where the CPU or GPU computes it
    natively). The defaults are the recipe measured in docs/fine-tuning.md: pointwise, every
    training pair, the top 8 layers, which finishes on Eedi's train.csv on 2 CPU cores within
    90 minutes, evaluation included."""

    output_dir: Path
    reranker: RerankerConfig = field(default_factory=_recipe_reranker)
    retriever: str = DEFAULT_EMBEDDER
    # The embedder's runtime, as the service reads it (RANKD_EMBEDDER_BACKEND, _QUANTIZATION,
    # _DEVICE, _CACHE_DIR): the candidates are those the service will retrieve.
    retrieval: RetrieverSettings = field(default_factory=RetrieverSettings)
    # Cross-fitting: `rankd train-retriever --folds K --fold i` outputs, one per fold. A training
    # pair of fold i gets its candidates from the retriever that never trained on it, as served
    # queries do; validation's still come from ``retriever``. Empty: ``retriever`` for all.
    fold_retrievers: tuple[str, ...] = ()
    device: str = "auto"
    candidates: int = 10  # N; with min_candidates, the largest N
    min_candidates: int = 0  # >= 2: each example draws its N from [min_candidates, candidates]
    examples: int = 0  # training pairs used (seeded draw); 0: all of them
    candidate_order: CandidateOrder = CandidateOrder.RETRIEVAL
    example_orders: ExampleOrders = ExampleOrders.ALTERNATE
    missing_positive: MissingPositive = MissingPositive.SKIP
    # Negatives drawn at random from the catalogue (seeded) in place of the last R retrieved
    # ones, beside the positive and the head's hard negatives; 0: the head alone, as served.
    random_negatives: int = 0
    max_tokens: int = 1024  # longer prompts are left out, and counted
    epochs: float = 1.0
    # 3e-4: 1e-4 left the loss near uniform (2.18 over the last steps) and the gain at +0.020;
    # 3e-4 reached +0.039 on the same examples (docs/fine-tuning.md, the arms).
    learning_rate: float = 3e-4
    warmup_ratio: float = 0.05
    batch_size: int = 1  # examples per forward pass
    gradient_accumulation: int = 8
    method: TuningMethod = TuningMethod.FULL
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_layers: int = 0  # LoRA on the last N decoder layers only; 0: all of them
    # Full fine-tuning of the last N decoder layers and the final norm only (0: every weight).
    # The layers below run forward alone: no gradients flow through them.
    train_layers: int = 8
    validation_fraction: float = 0.2
    # Questions no choice sees, reported at the end: the retriever's test split (the same
    # fraction and seed as `rankd train-retriever`'s). 0: report validation questions instead.
    test_fraction: float = 0.2
    # Validation queries (whole questions, seeded) the fusion is chosen on; never reported.
    # 0: all of them with a test split; without one, at most half of validation.
    fusion_queries: int = 0
    eval_queries: int = 0  # queries reported (whole questions); 0: all of them
    curve_points: int = 3  # evaluations during training, for the learning curve
    curve_queries: int = 100  # reported queries of those evaluations; 0: eval_queries'
    # Evaluate the model before training (the learning curve's first point). Runs that compare
    # options of one model and scoring mode can take it from one of them.
    base_eval: bool = False
    k: int = 25
    seed: int = 42
    threads: int = 0  # torch intra-op threads; 0 keeps torch's choice
    save_total_limit: int = 1
    progress: bool = True
    overwrite: bool = False

    @property
    def scoring(self) -> Scoring:
        return self.reranker.scoring

    def check(self) -> None:
        from retriever.pairs import require_positive

        positive = {"candidates": self.candidates, "epochs": self.epochs,
                    "learning rate": self.learning_rate, "batch size": self.batch_size,
                    "gradient accumulation": self.gradient_accumulation,
                    "LoRA rank": self.lora_rank, "k": self.k, "max tokens": self.max_tokens}
        require_positive(positive, RerankerTrainingError)
        if self.candidates < 2:
            raise RerankerTrainingError("candidates must be at least 2: the loss picks one of N")
        smallest = self.min_candidates or self.candidates
        if not 0 <= self.random_negatives < smallest:
            raise RerankerTrainingError(
                f"random negatives must be between 0 and the smallest N - 1 ({smallest - 1}): "
                f"the positive keeps a place; got {self.random_negatives}")
        if len(self.fold_retrievers) == 1:
            raise RerankerTrainingError("--fold-retrievers needs one retriever per fold, at "
                                        "least 2; got 1")
        if self.min_candidates and not 2 <= self.min_candidates <= self.candidates:
            raise RerankerTrainingError(
                f"min candidates must be 0 (a fixed N) or between 2 and candidates "
                f"({self.candidates}), got {self.min_candidates}")
        labels = len(self.reranker.label_alphabet.labels())
        if self.candidates > labels:
            raise RerankerTrainingError(
                f"candidates ({self.candidates}) exceeds the {labels} labels of "
                f"RANKD_RERANKER_LABEL_ALPHABET={self.reranker.label_alphabet}")
        for name, value in {"curve points": self.curve_points, "LoRA layers": self.lora_layers,
                            "train layers": self.train_layers, "examples": self.examples,
                            "eval queries": self.eval_queries,
                            "fusion queries": self.fusion_queries,
                            "curve queries": self.curve_queries}.items():
            if value < 0:
                raise RerankerTrainingError(f"{name} must not be negative, got {value}")
