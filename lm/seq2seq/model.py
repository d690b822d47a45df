"""Sequence-to-sequence models behind one interface, in two architectures:

- ``PrefixLM`` (``architecture: decoder``): a causal language model (GPT or LSTM) reading
  ``source <sep> target <eos>`` — the loss counts target tokens only (the source is context) and generation starts
  after the separator;
- ``EncoderDecoder`` (``architecture: encoder-decoder``): a bidirectional encoder reads the source once; a GPT
  decoder attends to it through cross-attention inserted in each block (BERT2GPT: "Leveraging Pre-trained
  Checkpoints for Sequence Generation Tasks", Rothe et al., 2020). Cross-attention is new; its output projection
  starts at zero, so a warm-started decoder computes exactly what the registered GPT did until training moves it.

Both extend the tokenizer's ``vocab_size`` ids by two: ``sep`` (``vocab_size``, ends the source / starts the
decoder) and ``eos`` (``vocab_size + 1``, ends the target). Decoding (``lm.seq2seq.decoding``) drives either through
``start`` / ``step`` / ``select`` (incremental, with a KV cache or the recurrent state) or ``recompute`` (the
reference without a cache).
"""

from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from lm.config import EncoderConfig, GPTConfig, ModelConfig
from lm.errors import DataError
from lm.models import build_model
from lm.models.encoder import Encoder
from lm.models.gpt import GPT, KVCache
from lm.seq2seq.pairs import PairBatch

SPECIAL = 2
"""Ids added after the tokenizer's: the separator and the end of the target."""


class Seq2Seq(nn.Module):
    """What both architectures share: the special ids, the loss on a ``PairBatch`` and the decoding interface."""

    objective = "seq2seq"
    architecture: str
    unused_parameters = False

    def __init__(self, base_vocab: int):
        super().__init__()
        self.base_vocab = base_vocab
        self.sep_id, self.eos_id = base_vocab, base_vocab + 1

    @property
    def vocab_size(self) -> int:
        return self.base_vocab

    max_length = None

    def score(self, batch: PairBatch, state: object = None, generator: torch.Generator | None = None):
        """Cross-entropy summed over the target tokens and each target's end, their count, and no state."""
        logits, labels, scored = self.teacher_forced(batch)
        nll = F.cross_entropy(logits[scored].float(), labels[scored], reduction="sum")
        return nll, int(scored.sum()), None

    def teacher_forced(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits (B, L, V + 2), labels (B, L), scored (B, L) bool: the positions predicting a target token)."""
        raise NotImplementedError

    # decoding: ``start`` reads the source, ``step`` appends one token per row, ``select`` reorders rows (beams)
    def start(self, source: list[int]) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def step(self, tokens: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def select(self, state: Any, index: torch.Tensor) -> Any:
        raise NotImplementedError

    def recompute(self, source: list[int], generated: list[int]) -> torch.Tensor:
        """The next-token logits (V + 2,) from scratch, without any decoding state (the cache's reference)."""
        raise NotImplementedError

    def max_new_tokens(self, source_length: int) -> int | None:
        """The most tokens decoding can add after a source of this length (None: no limit)."""
        raise NotImplementedError

    def pretrained(self) -> dict[str, nn.Module]:
        """The modules a registered model's weights go into, by role (``decoder``, ``encoder``)."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _tensor(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor([ids], dtype=torch.long, device=self.device)


def _positions(lengths: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.arange(width, device=lengths.device)[None, :]
    return p, lengths[:, None]


class PrefixLM(Seq2Seq):
    """A causal LM over ``source <sep> target <eos>``, its loss on the target and ``eos`` only."""

    architecture = "decoder"

    def __init__(self, lm: nn.Module, base_vocab: int):
        super().__init__(base_vocab)
        self.lm = lm
        self.context_length = lm.context_length
        self.limit = getattr(lm, "decode_limit", lm.context_length)  # a GPT's window; an LSTM has none

    def sequences(self, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, W) of ``source <sep> target <eos>`` right-padded with 0, the source lengths (B, 1))."""
        src, ls, tgt, lt = batch
        p, ls_ = _positions(ls, int((ls + lt).max()) + 2)
        lt_ = lt[:, None]
        src_part = src.gather(1, p.clamp(max=src.shape[1] - 1).expand(len(ls), -1))
        tgt_part = tgt.gather(1, (p - ls_ - 1).clamp(0, tgt.shape[1] - 1))
        ids = torch.where(p < ls_, src_part, torch.where(p <= ls_ + lt_, tgt_part, 0))
        ids = torch.where(p == ls_, self.sep_id, torch.where(p == ls_ + lt_ + 1, self.eos_id, ids))
        return ids, ls_

    def teacher_forced(self, batch: PairBatch):
        ids, ls_ = self.sequences(batch)
        logits = self.lm(ids[:, :-1]).logits
        p = torch.arange(ids.shape[1] - 1, device=ids.device)[None, :]
        scored = (p >= ls_) & (p <= ls_ + batch.target_lengths[:, None])  # predicting target[0] … eos
        return logits, ids[:, 1:], scored

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm.encode(tokens)

    def start(self, source):
        out = self.lm.decode(self._tensor(list(source) + [self.sep_id]), None)
        return out.logits[:, -1], out.state

    def step(self, tokens, state):
        out = self.lm.decode(tokens[:, None], state)
        return out.logits[:, -1], out.state

    def select(self, state, index):
        if isinstance(state, KVCache):
            return state.select(index)
        return tuple(s[:, index] for s in state)  # an LSTM's (h, c), each (layers, B, H)

    def recompute(self, source, generated):
        return self.lm(self._tensor(list(source) + [self.sep_id] + list(generated))).logits[0, -1]

    def max_new_tokens(self, source_length):
        return None if self.limit is None else self.limit - source_length - 1

    def pretrained(self):
        return {"decoder": self.lm}

    def num_parameters(self, *, non_embedding: bool = False) -> int:
        return self.lm.num_parameters(non_embedding=non_embedding)

    def layers(self):
        return self.lm.layers()

    def flops_per_token(self) -> float:
        return self.lm.flops_per_token()


class CrossAttention(nn.Module):
    """Decoder positions (queries) attending to the encoder's outputs (keys and values), padding masked."""

    def __init__(self, *, embed_dim: int, memory_dim: int, num_heads: int, bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.ln = nn.LayerNorm(embed_dim, bias=bias)
        self.q = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.kv = nn.Linear(memory_dim, 2 * embed_dim, bias=bias)
        self.proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        for layer in (self.q, self.kv):
            nn.init.normal_(layer.weight, std=0.02)
        nn.init.zeros_(self.proj.weight)  # starts as the identity of the residual stream: the LM as registered
        for layer in (self.q, self.kv, self.proj):
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

    def keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v), each (B, nh, S, hs): computed once per source and reused at every decoding step."""
        B, S, _ = memory.shape
        k, v = self.kv(memory).chunk(2, dim=-1)
        return tuple(t.view(B, S, self.num_heads, -1).transpose(1, 2) for t in (k, v))

    def forward(self, x: torch.Tensor, kv: tuple, memory_mask: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q = self.q(self.ln(x)).view(B, T, self.num_heads, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=memory_mask[:, None, None, :])
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class EncoderDecoder(Seq2Seq):
    """A bidirectional encoder and a GPT decoder joined by cross-attention in every decoder block."""

    architecture = "encoder-decoder"

    def __init__(self, encoder: Encoder, decoder: GPT, base_vocab: int):
        super().__init__(base_vocab)
        self.encoder, self.decoder = encoder, decoder
        self.context_length = decoder.context_length
        self.cross = nn.ModuleList(
            CrossAttention(embed_dim=decoder.cfg.embed_dim, memory_dim=encoder.cfg.embed_dim,
                           num_heads=decoder.cfg.num_heads, bias=decoder.cfg.bias)
            for _ in decoder.blocks
        )  # fmt: skip

    def memory(self, source: torch.Tensor, lengths: torch.Tensor) -> tuple[list[tuple], torch.Tensor]:
        """Each layer's cross-attention keys and values of the encoded source, and the source mask (B, S)."""
        mask = torch.arange(source.shape[1], device=source.device)[None, :] < lengths[:, None]
        hidden = self.encoder.encode(source, key_mask=mask)
        return [cross.keys_values(hidden) for cross in self.cross], mask

    def decode_hidden(self, tokens: torch.Tensor, kv: list, mask: torch.Tensor, cache: KVCache | None = None):
        """The decoder's trunk with cross-attention after each block's self-attention (see ``GPT._hidden``)."""
        d = self.decoder
        offset = cache.length if cache is not None else 0
        if offset + tokens.shape[1] > d.context_length:
            raise ValueError(f"target length {offset + tokens.shape[1]} exceeds context_length {d.context_length}")
        x, rope = d.embed(tokens, offset)
        for layer, block in enumerate(d.blocks):
            x = x + block.attn(block.ln_1(x), rope, cache, layer)
            x = x + self.cross[layer](x, kv[layer], mask)
            x = x + block.mlp(block.ln_2(x))
        if cache is not None:
            cache.length += tokens.shape[1]
        return d.lm_head(d.ln_f(x))

    def teacher_forced(self, batch: PairBatch):
        src, ls, tgt, lt = batch
        kv, mask = self.memory(src, ls)
        B = len(ls)
        inputs = torch.cat([torch.full((B, 1), self.sep_id, device=tgt.device), tgt], dim=1)  # <sep> target
        p, lt_ = _positions(lt, inputs.shape[1])
        labels = torch.where(p == lt_, self.eos_id, F.pad(tgt, (0, 1)))  # target <eos>
        return self.decode_hidden(inputs, kv, mask), labels, p <= lt_

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode(tokens)

    def start(self, source):
        ids = self._tensor(list(source))
        kv, mask = self.memory(ids, torch.tensor([len(source)], device=ids.device))
        cache = KVCache(len(self.decoder.blocks))
        logits = self.decode_hidden(self._tensor([self.sep_id]), kv, mask, cache)
        return logits[:, -1], (kv, mask, cache)

    def step(self, tokens, state):
        kv, mask, cache = state
        return self.decode_hidden(tokens[:, None], kv, mask, cache)[:, -1], state

    def select(self, state, index):
        kv, mask, cache = state
        return [(k[index], v[index]) for k, v in kv], mask[index], cache.select(index)

    def recompute(self, source, generated):
        ids = self._tensor(list(source))
        kv, mask = self.memory(ids, torch.tensor([len(source)], device=ids.device))
        return self.decode_hidden(self._tensor([self.sep_id] + list(generated)), kv, mask)[0, -1]

    def max_new_tokens(self, source_length):
        return self.decoder.context_length - 1

    def pretrained(self):
        return {"decoder": self.decoder, "encoder": self.encoder}

    def num_parameters(self, *, non_embedding: bool = False) -> int:
        cross = sum(p.numel() for p in self.cross.parameters())
        return (
            self.encoder.num_parameters(non_embedding=non_embedding)
            + cross
            + self.decoder.num_parameters(non_embedding=non_embedding)
        )

    def layers(self):
        return self.encoder.layers() + self.decoder.layers()[1:]

    def flops_per_token(self) -> float:
        return self.encoder.flops_per_token() + self.decoder.flops_per_token()


def encoder_config(decoder: GPTConfig) -> EncoderConfig:
    """A scratch encoder–decoder's encoder: the decoder's shape, bidirectional."""
    return EncoderConfig(**{**decoder.model_dump(), "kind": "encoder"})


def build_seq2seq(architecture: str, model: ModelConfig, base_vocab: int, encoder: EncoderConfig | None = None):
    """A freshly initialised seq2seq model (seed the global RNG first). ``model``: the decoder's architecture;
    ``encoder``: the encoder's (encoder-decoder only; default: the decoder's shape)."""
    if architecture == "decoder":
        return PrefixLM(build_model(model, base_vocab + SPECIAL), base_vocab)
    if model.kind != "gpt":
        raise ValueError(f"an encoder-decoder's decoder is a GPT, not {model.kind}")
    enc = Encoder(encoder or encoder_config(model), base_vocab)
    return EncoderDecoder(enc, GPT(model, base_vocab + SPECIAL), base_vocab)


def warm_start(module: nn.Module, weights, *, what: str) -> None:
    """Copy a registered model's weights (a safetensors file) into ``module``; a token table (rows = the module's
    ``vocab_size``) with two rows more than saved (the special ids) keeps its new rows. Anything else that does
    not match is a DataError naming it."""
    saved = load_file(str(weights))
    vocab = getattr(module, "vocab_size", None)
    groups: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)  # tied weights: saved under one of their names
    params = dict(module.named_parameters(remove_duplicate=False))
    used = set()
    with torch.no_grad():
        for names in groups.values():
            found = next((n for n in names if n in saved), None)
            if found is None:
                raise DataError(f"{what}: the registered weights have no {names[0]}: not the architecture expected")
            target, source = params[names[0]], saved[found]
            used.update(n for n in names if n in saved)
            if target.shape == source.shape:
                target.copy_(source)
            elif target.shape[0] == vocab == source.shape[0] + SPECIAL and target.shape[1:] == source.shape[1:]:
                target[: source.shape[0]].copy_(source)
            else:
                raise DataError(
                    f"{what}: {names[0]} is {tuple(source.shape)} in the registered weights, {tuple(target.shape)} here"
                )
    extra = sorted(set(saved) - used)
    if extra:
        raise DataError(f"{what}: the registered weights hold {extra[:3]}, which this architecture lacks")
