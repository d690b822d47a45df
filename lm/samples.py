"""The generation card: a champion and a challenger generate from the same prompts with the same seed and settings,
side by side, with per-prompt statistics and the challenger − champion deltas of their means.

Per output: its length (tokens of the model's own tokenizer, characters), distinct-1 and distinct-2 (distinct
n-grams of tokens / n-grams), the repetition rate (the share of the output's token 4-grams that repeat an earlier
4-gram of the same output: 0 for all-new text, near 1 for one token or phrase over and over), for a causal language
model the OTHER model's mean loss on it (nats/token of the other model's tokenizer: how surprising each model finds
the other's text) and, for seq2seq, the item's headline metric against the reference (chrF, ROUGE-L or exact match).
Classifiers and encoders generate nothing: ``side_by_side`` returns None for them.

Outputs are model text: untrusted. ``to_html`` escapes every string, ``to_markdown`` fences them.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lm.generation import generate
from lm.package import LANGUAGE_MODEL, Loaded, task_name

MAX_NEW_TOKENS = 64
"""The card never generates more than this per prompt (it runs at every gate that meets a champion)."""
REPEAT_N = 4


@dataclass(frozen=True)
class Prompt:
    """One input: a causal model continues ``text``; a seq2seq model transduces it, scored against ``reference``."""

    text: str
    reference: str | None = None


@dataclass(frozen=True)
class Settings:
    """How both models generate. ``temperature`` 0 is greedy; a seq2seq model decodes with its own ``decode``
    settings (beams, temperature), its output cut to ``max_new_tokens``."""

    max_new_tokens: int = MAX_NEW_TOKENS
    temperature: float = 0.0
    top_k: int | None = None
    seed: int = 0

    def describe(self) -> str:
        how = "greedy" if self.temperature == 0 else f"temperature {self.temperature:g}, top-k {self.top_k or 'off'}"
        return f"{how}, seed {self.seed}, at most {self.max_new_tokens} new tokens"


@dataclass(frozen=True)
class Output:
    """One model's output for one prompt and its statistics."""

    text: str
    tokens: int
    chars: int
    distinct_1: float
    distinct_2: float
    repetition: float
    other_loss: float | None = None
    """The other model's mean loss on this text (nats/token); causal models only."""
    metric: float | None = None
    """The item's metric against the reference; seq2seq only."""


@dataclass(frozen=True)
class Row:
    prompt: Prompt
    champion: Output
    challenger: Output


STATS = {  # stat → (label, format)
    "tokens": ("length (tokens)", "{:.1f}"),
    "chars": ("length (chars)", "{:.1f}"),
    "distinct_1": ("distinct-1", "{:.3f}"),
    "distinct_2": ("distinct-2", "{:.3f}"),
    "repetition": (f"repetition ({REPEAT_N}-grams)", "{:.3f}"),
    "other_loss": ("loss of the other model on it (nats/token)", "{:.3f}"),
    "metric": ("metric vs reference", "{:.3f}"),
}


@dataclass(frozen=True)
class SampleCard:
    """Both models' outputs for every prompt, the per-prompt statistics and the summary."""

    champion: str
    """How the champion is named on the card (e.g. ``smoke v1 (@champion)``)."""
    challenger: str
    settings: str
    rows: tuple[Row, ...]
    metric_name: str | None = None
    title: str = "Generation card"
    notes: tuple[str, ...] = field(default=())

    def stats(self) -> list[str]:
        """The statistics every row has (loss on the other's text for causal models, the metric for seq2seq)."""
        first = self.rows[0].champion if self.rows else None
        return [k for k in STATS if first is not None and getattr(first, k) is not None]

    def mean(self, side: str, stat: str) -> float:
        values = [getattr(getattr(row, side), stat) for row in self.rows]
        values = [v for v in values if v is not None and math.isfinite(v)]
        return sum(values) / len(values) if values else math.nan

    def summary(self) -> dict[str, tuple[float, float, float]]:
        """stat → (champion mean, challenger mean, challenger − champion)."""
        out = {}
        for stat in self.stats():
            a, b = self.mean("champion", stat), self.mean("challenger", stat)
            out[stat] = (a, b, b - a)
        return out

    def label(self, stat: str) -> str:
        return self.metric_name if stat == "metric" and self.metric_name else STATS[stat][0]

    def to_markdown(self) -> str:
        fmt = {k: STATS[k][1] for k in STATS}
        lines = [f"# {self.title}", "", f"**champion** {self.champion} · **challenger** {self.challenger}",
                 "", f"{len(self.rows)} prompts; {self.settings}.", *(f"\n{n}" for n in self.notes), "",
                 "| mean | champion | challenger | Δ (challenger − champion) |", "|---|---:|---:|---:|"]  # fmt: skip
        for stat, (a, b, d) in self.summary().items():
            lines.append(f"| {self.label(stat)} | {number(fmt[stat], a)} | {number(fmt[stat], b)} | {_signed(d)} |")
        for i, row in enumerate(self.rows, 1):
            lines += ["", f"## Prompt {i}", "", _fence(row.prompt.text)]
            if row.prompt.reference is not None:
                lines += ["", "reference:", "", _fence(row.prompt.reference)]
            for side, name in (("champion", self.champion), ("challenger", self.challenger)):
                lines += ["", f"**{side}** ({_cell(name)}):", "", _fence(getattr(row, side).text)]
            lines += ["", "| | champion | challenger |", "|---|---:|---:|"]
            for stat in self.stats():
                a, b = getattr(row.champion, stat), getattr(row.challenger, stat)
                lines.append(f"| {self.label(stat)} | {number(fmt[stat], a)} | {number(fmt[stat], b)} |")
        return "\n".join(lines) + "\n"

    def to_html(self) -> str:
        """A self-contained page (inline style, no script, nothing fetched); every string escaped."""
        e = html.escape
        fmt = {k: STATS[k][1] for k in STATS}
        summary = "".join(
            f"<tr><th>{e(self.label(s))}</th><td>{number(fmt[s], a)}</td><td>{number(fmt[s], b)}</td>"
            f"<td>{_signed(d)}</td></tr>"
            for s, (a, b, d) in self.summary().items()
        )
        rows = []
        for i, row in enumerate(self.rows, 1):
            stats = "".join(
                f"<tr><th>{e(self.label(s))}</th><td>{number(fmt[s], getattr(row.champion, s))}</td>"
                f"<td>{number(fmt[s], getattr(row.challenger, s))}</td></tr>"
                for s in self.stats()
            )
            reference = (f"<p>reference:</p><pre>{e(row.prompt.reference)}</pre>"
                         if row.prompt.reference is not None else "")  # fmt: skip
            rows.append(
                f"<section><h2>Prompt {i}</h2><pre class=prompt>{e(row.prompt.text)}</pre>{reference}"
                f"<table class=outputs><tr><th>champion — {e(self.champion)}</th>"
                f"<th>challenger — {e(self.challenger)}</th></tr>"
                f"<tr><td><pre>{e(row.champion.text)}</pre></td><td><pre>{e(row.challenger.text)}</pre></td></tr>"
                f"</table><table class=stats><tr><th></th><th>champion</th><th>challenger</th></tr>{stats}</table>"
                "</section>"
            )
        notes = "".join(f"<p>{e(n)}</p>" for n in self.notes)
        return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(self.title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:80em}}pre{{white-space:pre-wrap;background:#f6f6f6;
padding:.5em;margin:0}}table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:.3em .6em;
vertical-align:top;text-align:left}}table.outputs{{width:100%;table-layout:fixed}}</style></head>
<body><h1>{e(self.title)}</h1>
<p><b>champion</b> {e(self.champion)} · <b>challenger</b> {e(self.challenger)}</p>
<p>{len(self.rows)} prompts; {e(self.settings)}.</p>{notes}
<table><tr><th>mean</th><th>champion</th><th>challenger</th><th>Δ (challenger − champion)</th></tr>{summary}</table>
{"".join(rows)}
</body></html>
"""


def number(fmt: str, x: float | None) -> str:
    """``x`` formatted, or a dash when it is missing or not finite (the card's and `lmp compare --samples`'s cells)."""
    return "—" if x is None or not math.isfinite(x) else fmt.format(x)


def _signed(x: float) -> str:
    return "—" if not math.isfinite(x) else f"{x:+.3f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _fence(text: str) -> str:
    """``text`` in a code fence longer than any run of backticks in it (model text cannot close it)."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


# ------------------------------------------------------------------------------------------------- statistics
def ngrams(ids: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]


def distinct(ids: list[int], n: int) -> float:
    """Distinct n-grams / n-grams (0 for an output shorter than n)."""
    grams = ngrams(ids, n)
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition(ids: list[int], n: int = REPEAT_N) -> float:
    """The share of the n-grams that repeat an earlier one of the same output (0 when it has none)."""
    grams = ngrams(ids, n)
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


@torch.no_grad()
def mean_loss(model: torch.nn.Module, context: list[int], target: list[int]) -> float:
    """The causal ``model``'s mean next-token loss (nats/token) on ``target`` after ``context``, window by window
    when they are longer than its context (each target sees at least half a window of what precedes it)."""
    if not target:
        return math.nan
    ids = (context or [0]) + target
    first, ctx = len(ids) - len(target), model.context_length
    step = max(1, ctx // 2)
    total = 0.0
    for a in range(first, len(ids), step):
        b = min(a + step, len(ids))
        start = max(0, b - 1 - ctx)
        window = torch.tensor([ids[start : b - 1]])  # (1, T) inputs; logits at i predict ids[start + i + 1]
        logits = model(window).logits[0, a - 1 - start :].float()  # (b - a, V)
        total += F.cross_entropy(logits, torch.tensor(ids[a:b]), reduction="sum").item()
    return total / len(target)


def _stats(text: str, ids: list[int], **extra) -> Output:
    return Output(text=text, tokens=len(ids), chars=len(text), distinct_1=distinct(ids, 1),
                  distinct_2=distinct(ids, 2), repetition=repetition(ids), **extra)  # fmt: skip


# ------------------------------------------------------------------------------------------------- generation
def kind(loaded: Loaded) -> str | None:
    """``causal``, ``seq2seq``, or None for what generates no text (a classifier, an encoder)."""
    name = task_name(loaded.config)
    if name == "seq2seq":
        return "seq2seq"
    if name == LANGUAGE_MODEL and getattr(loaded.model, "objective", None) == "causal":
        return "causal"
    return None


def continue_text(loaded: Loaded, prompt: str, settings: Settings) -> list[int]:
    """A causal model's new ids after ``prompt``."""
    return generate(loaded.model, loaded.tokenizer.encode(prompt) or [0], max_new_tokens=settings.max_new_tokens,
                    temperature=settings.temperature, top_k=settings.top_k, seed=settings.seed)  # fmt: skip


def transduce(loaded: Loaded, source: str, settings: Settings) -> list[int]:
    """A seq2seq model's output ids for ``source``, decoded as the package decodes (its ``decode`` settings)."""
    from lm.seq2seq.decoding import decode
    from lm.seq2seq.stages import source_ids

    how = loaded.config.get("decode", {})
    budget = min(settings.max_new_tokens, how.get("max_new_tokens", settings.max_new_tokens))
    ids = decode(loaded.model, source_ids(loaded.tokenizer, source, loaded.config, budget), max_new_tokens=budget,
                 num_beams=how.get("num_beams", 1), length_penalty=how.get("length_penalty", 1.0),
                 temperature=how.get("temperature", 0.0), seed=settings.seed)  # fmt: skip
    return [t for t in ids if t < loaded.model.base_vocab]


def side_by_side(champion: Loaded, challenger: Loaded, prompts, settings: Settings, *,
                 names: tuple[str, str] = ("champion", "challenger")) -> SampleCard | None:  # fmt: skip
    """Both models' outputs for every prompt (``Prompt`` or plain text) and their statistics; None when the models
    generate no text or are of different kinds (nothing to lay side by side)."""
    found = kind(champion)
    if found is None or kind(challenger) != found:
        return None
    prompts = [p if isinstance(p, Prompt) else Prompt(str(p)) for p in prompts]
    rows = [(_causal_row if found == "causal" else _seq2seq_row)(champion, challenger, p, settings) for p in prompts]
    metric = None
    if found == "seq2seq":
        from lm.seq2seq.metrics import HEADLINE

        metric = f"{HEADLINE[challenger.config['application']]} vs reference"
    settings_text = settings.describe() if found == "causal" else (
        f"each model decodes as it was evaluated (its own decode settings), seed {settings.seed}, at most "
        f"{settings.max_new_tokens} new tokens")  # fmt: skip
    return SampleCard(champion=names[0], challenger=names[1], settings=settings_text, rows=tuple(rows),
                      metric_name=metric)  # fmt: skip


def _causal_row(champion: Loaded, challenger: Loaded, prompt: Prompt, settings: Settings) -> Row:
    outputs = {}
    for side, loaded in (("champion", champion), ("challenger", challenger)):
        ids = continue_text(loaded, prompt.text, settings)
        outputs[side] = (loaded.tokenizer.decode(ids), ids)
    result = {}
    for side, other in (("champion", challenger), ("challenger", champion)):
        text, ids = outputs[side]
        loss = mean_loss(other.model, other.tokenizer.encode(prompt.text), other.tokenizer.encode(text))
        result[side] = _stats(text, ids, other_loss=loss)
    return Row(prompt=prompt, **result)


def _seq2seq_row(champion: Loaded, challenger: Loaded, prompt: Prompt, settings: Settings) -> Row:
    from lm.seq2seq.metrics import HEADLINE, score

    result = {}
    for side, loaded in (("champion", champion), ("challenger", challenger)):
        ids = transduce(loaded, prompt.text, settings)
        text = loaded.tokenizer.decode(ids)
        metric = None
        if prompt.reference is not None:
            application = loaded.config["application"]
            scored, _ = score(application, [text], [prompt.reference], prefix="item",
                              target_lang=loaded.config.get("target_lang"))  # fmt: skip
            metric = scored[f"item_{HEADLINE[application]}"]
        result[side] = _stats(text, ids, metric=metric if metric is not None else math.nan)
    return Row(prompt=prompt, **result)
