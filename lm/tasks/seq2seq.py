"""Sequence to sequence (``task: seq2seq``) — translation, summarization, question answering: (source, target)
pairs → the initialising model's tokenizer (or one trained on the pairs) → a decoder read as a prefix LM, or an
encoder–decoder warm-started from a registered encoder and GPT → loss on targets, the application's metrics
(chrF/BLEU, ROUGE, exact match/F1) beside its baseline → a package that answers a text with a generated text."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from torch import nn

from lm import package as packaging
from lm import plan as planning
from lm.cache import inputs_key
from lm.checkpoint import sha256_file
from lm.config import MODEL_CONFIG, EncoderConfig, ModelConfig, flatten
from lm.errors import DataError
from lm.generation_params import GenerationParams
from lm.report import Card, DatasetRecord, Table, code_block, shape
from lm.results import Encoded, EncodedPairs, Evaluation, Init, Package, PairDataset, Served, Trained
from lm.runtime import Runtime
from lm.seq2seq import data as pairdata
from lm.seq2seq import stages
from lm.seq2seq.model import build_seq2seq, encoder_config, warm_start
from lm.tasks.base import init_tags

HEADLINE = (
    "val_chrf", "val_bleu", "val_baseline_chrf", "val_rougeL", "val_rouge1", "val_rouge2", "val_baseline_rougeL",
    "val_exact_match", "val_token_f1", "val_baseline_exact_match", "val_target_loss", "test_chrf", "test_bleu",
    "test_rougeL", "test_exact_match",
)  # fmt: skip


class Seq2SeqTask:
    name: ClassVar[str] = "seq2seq"
    data_root: ClassVar[str] = "pairs"
    tokens_root: ClassVar[str] = "pairs-tokens"
    encoded_type: ClassVar[type[Encoded]] = EncodedPairs
    summary_metrics: ClassVar[tuple[str, ...]] = (
        "val_chrf", "val_bleu", "val_rougeL", "val_exact_match", "val_token_f1", "val_target_loss",
    )  # fmt: skip

    def __init__(self, spec):
        self.spec = spec

    # ------------------------------------------------------------------ initialising models
    def init_from(self) -> str | None:
        return None if self.spec.scratch else self.spec.init_from

    def init_parts(self) -> dict[str, str]:
        if self.spec.scratch or self.spec.architecture != "encoder-decoder":
            return {}
        return {"encoder": self.spec.encoder_from}

    def check_init(self, init: Init) -> None:
        """A language model whose kind fits the architecture; an encoder–decoder's two share one tokenizer."""
        kinds = {"decoder": ("gpt", "lstm"), "encoder-decoder": ("gpt",)}[self.spec.architecture]
        for role, each, wanted in [("init_from", init, kinds)] + [
            (f"{role}_from", part, ("encoder",)) for role, part in init.parts.items()
        ]:
            config = packaging.read_config(each.package)
            task, kind = packaging.task_name(config), config["model"]["kind"]
            if task != "language-model":
                raise DataError(f"{role} {each.requested} is a {task} model; start from a registered language model")
            if kind not in wanted:
                hint = (
                    "a masked-LM encoder cannot generate: use it as encoder_from of an architecture: encoder-decoder "
                    "pipeline" if kind == "encoder" else f"register a {' or '.join(wanted)} model and start from it"
                )  # fmt: skip
                raise DataError(f"{role} {each.requested} has model.kind {kind}, not {' or '.join(wanted)}: {hint}")
        if "encoder" in init.parts:
            encoder = init.parts["encoder"]
            mine, theirs = sha256_file(Path(init.package.tokenizer)), sha256_file(Path(encoder.package.tokenizer))
            if mine != theirs:
                raise DataError(
                    f"init_from {init.requested} and encoder_from {encoder.requested} have different tokenizers "
                    f"(tokenizer.json {mine[:12]}… and {theirs[:12]}…): the encoder and the decoder must read the "
                    "same ids; register both from pipelines with the same tokenizer and data"
                )

    # ------------------------------------------------------------------ data
    def prepare(self, root: Path, *, base_dir: Path) -> PairDataset:
        return stages.prepare(self.spec.data, root, base_dir=base_dir)

    def decoder(self, init: Init | None) -> ModelConfig:
        return MODEL_CONFIG.validate_python(init.model) if init else self.spec.model

    def encoder(self, init: Init | None) -> EncoderConfig | None:
        if self.spec.architecture != "encoder-decoder":
            return None
        return EncoderConfig.model_validate(init.parts["encoder"].model) if init else encoder_config(self.spec.model)

    def lengths(self, init: Init | None) -> dict[str, int | None]:
        """What pairs are cut to: the spec's limits within the model's contexts."""
        limits, decoder, encoder = self.spec.lengths, self.decoder(init), self.encoder(init)
        if encoder is not None:
            return {"max_source": min(limits.max_source_tokens, encoder.context_length),
                    "max_target": min(limits.max_target_tokens, decoder.context_length - 1), "total": None}  # fmt: skip
        total = decoder.context_length if decoder.kind == "gpt" else None  # an LSTM carries its state past it
        target = limits.max_target_tokens if total is None else min(limits.max_target_tokens, total - 3)
        return {"max_source": limits.max_source_tokens, "max_target": target, "total": total}

    def encode(self, prepared: PairDataset, init: Init | None, root: Path) -> EncodedPairs:
        tokenizer = Path(init.package.tokenizer) if init else self.spec.tokenizer
        return stages.encode(prepared, tokenizer, root, lengths=self.lengths(init),
                             target_lang=getattr(self.spec.data, "target_lang", None))  # fmt: skip

    def ingest_key(self, base_dir: Path) -> str:
        return inputs_key(pairdata.dataset_inputs(self.spec.data, Path(base_dir)))

    def tokens_key(self, data_digest: str) -> str | None:
        return None  # the tokenizer may be the init model's, known once a run resolves it

    def describe(self) -> str:
        return pairdata.describe(self.spec.data)

    def dataset(self, prepared: PairDataset) -> DatasetRecord:
        rows = [{"split": s, "pairs": n, "dropped_empty": prepared.dropped.get(s, 0),
                 "source_also_in_train": prepared.duplicates.get(s, 0)} for s, n in prepared.pairs.items()]  # fmt: skip
        counts = {f"data_pairs_{s}": n for s, n in prepared.pairs.items()}
        return DatasetRecord(rows, self.describe(), prepared.path, prepared.digest, counts)

    def params(self, encoded: EncodedPairs, init: Init | None) -> dict:
        cut = {f"data_truncated_{side}_{s}": n for s, per in encoded.truncated.items() for side, n in per.items()}
        lengths = {f"lengths.{k}": v for k, v in encoded.lengths.items() if v is not None}
        arch = {} if init is None else flatten({"model": init.model}) | {"tokenizer.kind": encoded.tokenizer_source}
        if init is not None and "encoder" in init.parts:
            arch |= flatten({"encoder": init.parts["encoder"].model})
        return arch | lengths | cut | {"application": encoded.application}

    def lineage_tags(self, init: Init | None) -> dict[str, str]:
        return init_tags(init) | {"task": self.name}

    # ------------------------------------------------------------------ model
    def model(self, encoded: EncodedPairs, init: Init | None):
        """The untrained model (weights not loaded)."""
        return build_seq2seq(self.spec.architecture, self.decoder(init), encoded.vocab_size, self.encoder(init))

    def fit(self, encoded: EncodedPairs, init: Init | None, out: Path, *, on_start: Callable | None = None,
            **hooks) -> Trained:  # fmt: skip
        def build():
            model = self.model(encoded, init)
            if init is not None:
                pretrained = model.pretrained()
                warm_start(pretrained["decoder"], init.package.weights, what=f"init_from {init.requested}")
                for role, part in init.parts.items():
                    warm_start(pretrained[role], part.package.weights, what=f"{role}_from {part.requested}")
            return model

        state = {
            "task": self.name,
            "architecture": self.spec.architecture,
            "model": self.decoder(init).model_dump(mode="json"),
            "init_weights": init.weights_digest if init else None,
            "encoder_weights": init.parts["encoder"].weights_digest if init and init.parts else None,
        }
        return stages.fit(encoded, build, self.spec.train, out, state, on_start=on_start, **hooks)

    def evaluate(self, encoded: EncodedPairs, trained: Trained, init: Init | None) -> Evaluation:
        return stages.evaluate(encoded, trained.checkpoint, self.model(encoded, init), self.spec.decode,
                               self.spec.train)  # fmt: skip

    def export(self, encoded: EncodedPairs, trained: Trained, init: Init | None, out_dir: Path) -> Package:
        encoder = self.encoder(init)
        config = {
            "task": self.name,
            "architecture": self.spec.architecture,
            "model": self.decoder(init).model_dump(mode="json"),
            "encoder": encoder.model_dump(mode="json") if encoder else None,
            "vocab_size": encoded.vocab_size,
            "application": encoded.application,
            "target_lang": encoded.target_lang,
            "lengths": encoded.lengths,
            "decode": self.spec.decode.model_dump(mode="json"),
            "served_params": served_defaults(self.spec.decode.model_dump()),
        }
        weights = Path(trained.checkpoint) / packaging.FILES["weights"]
        return packaging.export(out_dir, weights=weights, tokenizer=encoded.tokenizer_file, config=config)

    def served(self, evaluation: Evaluation, trained: Trained, encoded: EncodedPairs) -> Served:
        sample = evaluation.samples[0] if evaluation.samples else {"source": "text", "output": "text"}
        return Served(example_input=sample["source"], example_output=[sample["output"]],
                      params=served_defaults(self.spec.decode.model_dump()))  # fmt: skip

    def version_tags(self, evaluation: Evaluation) -> dict[str, str]:
        return {"task": self.name, **{k: f"{v:.6g}" for k, v in evaluation.metrics.items()}}

    # ------------------------------------------------------------------ report
    def card(self, encoded: EncodedPairs, trained: Trained, evaluation: Evaluation, init: Init | None) -> Card:
        spec, c = self.spec, trained.card
        decoder, encoder = self.decoder(init).model_dump(mode="json"), self.encoder(init)
        if init is None:
            lineage = "trained from scratch (no pretrained weights)"
        else:
            lineage = f"decoder from `{init.uri}` (asked for `{init.requested}`)" + "".join(
                f"; {role} from `{part.uri}` (asked for `{part.requested}`)" for role, part in init.parts.items()
            )
        shape_text = f"decoder {shape(decoder)}" + (f", encoder {shape(encoder.model_dump())}, cross-attention "
                                                    "in every decoder block" if encoder else "")  # fmt: skip
        cut = ", ".join(f"{s}: {v['source']} sources / {v['target']} targets" for s, v in encoded.truncated.items())
        return Card(
            rows=[
                ("application", encoded.application),
                ("lineage", lineage),
                ("architecture", f"{spec.architecture} ({shape_text})"),
                ("parameters", f"{c['num_parameters']:,}"),
                (
                    "tokenizer",
                    f"{encoded.tokenizer_source}, {encoded.vocab_size} ids + separator and end, digest "
                    f"`{encoded.tokenizer_digest[:12]}`; it cannot write {encoded.unknown.get('train', 0.0):.1%} of "
                    "the training targets' characters",
                ),  # fmt: skip
                ("data", f"{spec.data.source}, digest `{encoded.data_digest[:12]}`, pairs {encoded.pairs}"),
                ("lengths", f"{encoded.lengths}; pairs cut — {cut}"),
            ],
            headline=HEADLINE,
            metrics_note=(
                "Baseline on the same split: copy the source (translation, summarization) or the most frequent "
                f"training answer (question answering). Protocol: {evaluation.protocol}."
            ),
            sections=[("Example outputs (validation)", code_block(evaluation.summary))],
            tables=[Table("outputs", evaluation.samples, "sources, references and outputs (validation)")],
        )

    # ------------------------------------------------------------------ packages
    def evaluate_package(self, package: Package, data_path: Path, runtime: Runtime) -> dict[str, float]:
        return stages.evaluate_package(package, data_path, runtime)

    def plan(self, workdir: Path, base_dir: Path, resume, *, verify: bool = False) -> list:
        inits = [u for u in [self.init_from(), *self.init_parts().values()] if u]
        return planning.plan_examples(
            self.spec.name, lambda: pairdata.dataset_inputs(self.spec.data, Path(base_dir)),
            lambda key: pairdata.cached_pairs(Path(workdir) / self.data_root, key), what="pairs",
            init_from=inits, workdir=workdir, resume=resume,
        )  # fmt: skip

    @staticmethod
    def build_packaged(config: dict) -> nn.Module:
        encoder = EncoderConfig.model_validate(config["encoder"]) if config.get("encoder") else None
        return build_seq2seq(config["architecture"], MODEL_CONFIG.validate_python(config["model"]),
                             config["vocab_size"], encoder)  # fmt: skip


def served_defaults(decode: dict) -> dict:
    """The served model's request params: the generation params, defaulting to how evaluation decoded."""
    return GenerationParams().as_dict() | {
        "max_new_tokens": decode["max_new_tokens"], "temperature": decode["temperature"], "top_k": 0,
        "num_beams": decode["num_beams"], "length_penalty": decode["length_penalty"],
    }  # fmt: skip
