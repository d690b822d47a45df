"""Hand-written PyTorch loops to compare `lmp run` against: how long until validation loss ≤ a target.

  python bench/baselines.py --target 1.88

Both read the data the `shakespeare-quick-lstm` pipeline uses (the first 1,115,394 characters of the
built-in plays, 90/10 tail split, one id per character); preparing it is not timed.

- `lstm`: the PyTorch word_language_model example at character level — 2 × 200 LSTM, embedding 200,
  dropout 0.2, plain SGD at lr 20 with clipping 0.25, BPTT 35, batch 20, state carried, fp32.
- `gpt`: the nanoGPT CPU recipe — 4 layers × 128, 4 heads, context 64, batch 12, AdamW lr 1e-3
  (warm-up 100, cosine to 1e-4 at 2000 steps), fp32.

The clock stops while the validation loss is measured (every ``--eval-every`` seconds of training),
which favours the baselines. Validation loss is the same protocol as the pipeline's: the whole split,
in order, mean nats per character (the LSTM carries its state, the GPT reads non-overlapping windows).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lm import stages
from lm.config import BuiltinData, CharTokenizerConfig, GPTConfig
from lm.models import build_model


def load_data() -> tuple[np.ndarray, np.ndarray, int]:
    root = Path(tempfile.mkdtemp(prefix="lmp-baseline-"))
    corpus = stages.ingest(BuiltinData(max_chars=1_115_394), root / "data", base_dir=root, context_length=64)
    tokens = stages.tokenize(corpus, CharTokenizerConfig(), root / "tokens", context_length=64)
    read = lambda split: np.fromfile(Path(tokens.path) / f"{split}.bin", dtype=tokens.dtype).astype(np.int64)  # noqa: E731
    return read("train"), read("val"), tokens.vocab_size


class Clock:
    """Training time only: paused while validating."""

    def __init__(self):
        self.elapsed, self.started = 0.0, time.perf_counter()

    def pause(self) -> float:
        self.elapsed += time.perf_counter() - self.started
        return self.elapsed

    def resume(self) -> None:
        self.started = time.perf_counter()


class RNNModel(nn.Module):
    def __init__(self, ntoken: int, ninp: int = 200, nhid: int = 200, nlayers: int = 2, dropout: float = 0.2):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        for w in (self.encoder.weight, self.decoder.weight):
            nn.init.uniform_(w, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, x, hidden=None):
        out, hidden = self.rnn(self.drop(self.encoder(x)), hidden)
        return self.decoder(self.drop(out)), hidden


def batchify(data: np.ndarray, bsz: int) -> torch.Tensor:
    n = data.size // bsz
    return torch.from_numpy(data[: n * bsz]).view(bsz, n).t().contiguous()  # (n, bsz)


@torch.no_grad()
def lstm_val(model: RNNModel, val: torch.Tensor, bptt: int) -> float:
    model.eval()
    total, count, hidden = 0.0, 0, None
    for i in range(0, val.size(0) - 1, bptt):
        seq = min(bptt, val.size(0) - 1 - i)
        out, hidden = model(val[i : i + seq], hidden)
        total += F.cross_entropy(out.flatten(0, 1), val[i + 1 : i + 1 + seq].flatten(), reduction="sum").item()
        count += seq * val.size(1)
    model.train()
    return total / count


def run_lstm(train, val, vocab, target, eval_every, max_seconds, bptt=35, bsz=20, lr=20.0, clip=0.25):
    torch.manual_seed(1111)
    model = RNNModel(vocab)
    train_data, val_data = batchify(train, bsz), batchify(val, 10)
    clock, next_eval, history, tokens = Clock(), eval_every, [], 0
    while True:
        hidden = None
        for i in range(0, train_data.size(0) - 1, bptt):
            seq = min(bptt, train_data.size(0) - 1 - i)
            if hidden is not None:
                hidden = tuple(h.detach() for h in hidden)
            model.zero_grad()
            out, hidden = model(train_data[i : i + seq], hidden)
            loss = F.cross_entropy(out.flatten(0, 1), train_data[i + 1 : i + 1 + seq].flatten())
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), clip)
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-lr)
            tokens += seq * bsz
            if time.perf_counter() - clock.started + clock.elapsed >= next_eval:
                t = clock.pause()
                history.append((t, lstm_val(model, val_data, bptt), tokens))
                next_eval += eval_every
                if history[-1][1] <= target or t >= max_seconds:
                    return history
                clock.resume()


@torch.no_grad()
def gpt_val(model, val: np.ndarray, ctx: int) -> float:
    model.eval()
    n = (val.size - 1) // ctx * ctx
    x = torch.from_numpy(val[:n]).view(-1, ctx)
    y = torch.from_numpy(val[1 : n + 1]).view(-1, ctx)
    total = 0.0
    for i in range(0, x.size(0), 256):
        logits = model(x[i : i + 256]).logits
        total += F.cross_entropy(logits.flatten(0, 1), y[i : i + 256].flatten(), reduction="sum").item()
    model.train()
    return total / y.numel()


def run_gpt(train, val, vocab, target, eval_every, max_seconds, steps=2000, batch=12, ctx=64):
    torch.manual_seed(1337)
    model = build_model(GPTConfig(num_layers=4, num_heads=4, embed_dim=128, context_length=ctx), vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    train_t = torch.from_numpy(train)
    clock, next_eval, history = Clock(), eval_every, []
    for step in range(steps):
        cosine = 1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * (step - 100) / 1900))
        lr = 1e-3 * (step + 1) / 100 if step < 100 else cosine
        for group in opt.param_groups:
            group["lr"] = lr
        ix = torch.randint(train_t.numel() - ctx - 1, (batch,))
        x = torch.stack([train_t[i : i + ctx] for i in ix])
        y = torch.stack([train_t[i + 1 : i + 1 + ctx] for i in ix])
        loss = F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if time.perf_counter() - clock.started + clock.elapsed >= next_eval or step == steps - 1:
            t = clock.pause()
            history.append((t, gpt_val(model, val, ctx), (step + 1) * batch * ctx))
            next_eval += eval_every
            if history[-1][1] <= target or t >= max_seconds:
                return history
            clock.resume()
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=float, default=1.88, help="validation loss target (nats/char)")
    parser.add_argument("--eval-every", type=float, default=1.0, help="seconds of training between evaluations")
    parser.add_argument("--max-seconds", type=float, default=240.0)
    parser.add_argument("--only", choices=["lstm", "gpt"])
    args = parser.parse_args()
    train, val, vocab = load_data()
    print(f"data: {train.size:,} train / {val.size:,} validation characters, vocabulary {vocab}")
    rows = []
    for name, fn in (("lstm", run_lstm), ("gpt", run_gpt)):
        if args.only and name != args.only:
            continue
        history = fn(train, val, vocab, args.target, args.eval_every, args.max_seconds)
        for t, loss, tokens in history:
            print(f"  {name} {t:7.1f} s  val {loss:.4f}  {tokens:,} tokens")
        hit = next(((t, tok) for t, loss, tok in history if loss <= args.target), None)
        rows.append((name, hit, history[-1]))
    print(f"\n{'loop':<6}{'seconds to target':>19}{'tokens to target':>18}{'last val':>10}{'tokens/s':>10}")
    for name, hit, (t, loss, tokens) in rows:
        print(
            f"{name:<6}{(f'{hit[0]:.1f}' if hit else 'not reached'):>19}{(f'{hit[1]:,}' if hit else '-'):>18}"
            f"{loss:>10.4f}{tokens / t:>10,.0f}"
        )


if __name__ == "__main__":
    main()
