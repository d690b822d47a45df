"""GPT-style decoder: pre-norm blocks, causal scaled-dot-product attention, tied embeddings.

Reads top-down in architecture order: attention, MLP, block, then the assembled model.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from lm.config import GPTConfig
from lm.models.base import LMOutput, causal_score


def rotary_tables(length: int, head_dim: int, device: torch.device, base: float = 10000.0) -> tuple:
    """(cos, sin), each (length, head_dim / 2): the rotation angles of rotary position embeddings."""
    inverse = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inverse)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, nh, T, hs) queries or keys pairwise (first half with second half) by position."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


class KVCache:
    """Keys and values of the tokens decoded so far, per layer: (B, nh, T, hs) each. Grows by concatenation."""

    def __init__(self, num_layers: int):
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.length = 0

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this call's keys/values for ``layer``; return all of them."""
        past = self.layers[layer]
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        self.layers[layer] = (k, v)
        return k, v

    def select(self, index: torch.Tensor) -> KVCache:
        """A cache of the batch rows ``index`` (beam search keeps, drops and copies rows)."""
        chosen = KVCache(len(self.layers))
        chosen.layers = [None if kv is None else (kv[0][index], kv[1][index]) for kv in self.layers]
        chosen.length = self.length
        return chosen


class SelfAttention(nn.Module):
    """Multi-head self-attention; ``causal`` masks the future (decoder) or not (encoder).

    ``rope`` — the (cos, sin) tables of ``rotary_tables`` — rotates queries and keys (rotary positions).
    """

    def __init__(self, *, embed_dim: int, num_heads: int, dropout: float, bias: bool, causal: bool = True):
        super().__init__()
        self.num_heads, self.causal = num_heads, causal
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape  # batch, time, channels
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2) for t in (q, k, v))
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:  # decoding: attend to every earlier token too
            k, v = cache.extend(layer, k, v)
        # One new token attends to all cached ones; a prompt (cache empty before it) is masked causally.
        # ``key_mask`` (B, T), True for real tokens, keeps every position from attending to padding.
        # ``bool(causal)``: under torch.export ``T > 1`` is symbolic; the flag must be a plain bool (ONNX export).
        mask, causal = None, self.causal and T > 1
        if key_mask is not None:
            mask = key_mask[:, None, None, :]
            if causal:
                mask = mask & torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=bool(causal), dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, *, embed_dim: int, dropout: float, bias: bool, activation: str = "gelu"):
        super().__init__()
        self.approximate = "tanh" if activation == "gelu_tanh" else "none"
        self.fc = nn.Linear(embed_dim, 4 * embed_dim, bias=bias)
        self.proj = nn.Linear(4 * embed_dim, embed_dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate=self.approximate)))


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(
        self,
        *,
        embed_dim: int,
        num_heads: int,
        dropout: float,
        bias: bool,
        causal: bool = True,
        activation: str = "gelu",
    ):
        super().__init__()
        self.ln_1 = nn.LayerNorm(embed_dim, bias=bias)
        self.attn = SelfAttention(embed_dim=embed_dim, num_heads=num_heads, dropout=dropout, bias=bias, causal=causal)
        self.ln_2 = nn.LayerNorm(embed_dim, bias=bias)
        self.mlp = MLP(embed_dim=embed_dim, dropout=dropout, bias=bias, activation=activation)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        key_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, cache, layer, key_mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """The shared trunk: token (+ learned position) embeddings → blocks → final norm. ``encode()`` gives
    (B, T, C) features; subclasses add the head and the objective (GPT: causal; Encoder: bidirectional).
    With ``positions: rotary`` there is no position embedding: attention rotates queries and keys."""

    def __init__(self, cfg: GPTConfig, vocab_size: int, *, causal: bool, extra_tokens: int = 0):
        super().__init__()
        self.cfg = cfg
        self.context_length = cfg.context_length
        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size + extra_tokens, cfg.embed_dim)
        self.rotary = cfg.positions == "rotary"
        self.position_embedding = None if self.rotary else nn.Embedding(cfg.context_length, cfg.embed_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(
                embed_dim=cfg.embed_dim,
                num_heads=cfg.num_heads,
                dropout=cfg.dropout,
                bias=cfg.bias,
                causal=causal,
                activation=cfg.activation,
            )  # fmt: skip
            for _ in range(cfg.num_layers)
        )
        self.ln_f = nn.LayerNorm(cfg.embed_dim, bias=cfg.bias)
        self._add_head()
        self.apply(self._init_weights)
        # GPT-2 scaling of residual projections by depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.num_layers))

    def _add_head(self) -> None:
        """Subclasses add output modules here, before initialisation."""

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    unused_parameters = False
    """Whether training leaves some parameters without a gradient (DistributedDataParallel must look for them)."""

    @property
    def max_length(self) -> int:
        """Longest sequence ``encode`` accepts (task heads read longer texts window by window)."""
        return self.context_length

    def layers(self) -> list[list[nn.Parameter]]:
        """The parameters by depth: [embeddings, block 1, …, block N] (what a task head freezes)."""
        embeddings = [self.token_embedding.weight] + (
            [self.position_embedding.weight] if self.position_embedding else []
        )
        return [embeddings] + [list(block.parameters()) for block in self.blocks]

    def encode(self, tokens: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) → final hidden states (B, T, C), after the last layer norm. ``key_mask`` (B, T):
        True for real tokens; padding is then never attended to."""
        return self._hidden(tokens, key_mask=key_mask)

    def embed(self, tokens: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, tuple | None]:
        """The trunk's input for ``tokens`` (B, T) at positions ``offset…``: embeddings (B, T, C) after dropout,
        and the rotary tables the blocks apply (None with learned positions, which are added here)."""
        T = tokens.shape[1]
        x = self.token_embedding(tokens)  # (B, T, C)
        rope = None
        if self.rotary:
            cos, sin = rotary_tables(offset + T, self.cfg.embed_dim // self.cfg.num_heads, tokens.device)
            rope = (cos[offset:], sin[offset:])
        else:
            x = x + self.position_embedding(torch.arange(offset, offset + T, device=tokens.device))
        return self.dropout(x), rope

    def _hidden(
        self, tokens: torch.Tensor, cache: KVCache | None = None, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The trunk; with ``cache``, ``tokens`` continue the sequence the cache holds (and extend it)."""
        T, offset = tokens.shape[1], cache.length if cache is not None else 0
        if offset + T > self.context_length:
            raise ValueError(f"sequence length {offset + T} exceeds context_length {self.context_length}")
        if cache is not None and offset and T > 1:
            raise ValueError("a KV cache is extended one token at a time after the prompt")
        x, rope = self.embed(tokens, offset)
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, cache, layer, key_mask)
        if cache is not None:
            cache.length += T
        return self.ln_f(x)

    def num_parameters(self, *, non_embedding: bool = False) -> int:
        """Parameters counted once (a tied output matrix is the input embedding)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.token_embedding.weight.numel()
            n -= self.position_embedding.weight.numel() if self.position_embedding is not None else 0
        return n

    def flops_per_token(self) -> float:
        """Training FLOPs per token ≈ 6·N + 12·L·d·T (N: non-embedding params + the tied output matrix)."""
        cfg = self.cfg
        n = self.num_parameters(non_embedding=True) + self.vocab_size * cfg.embed_dim
        return 6.0 * n + 12.0 * cfg.num_layers * cfg.embed_dim * cfg.context_length


class GPT(Transformer):
    """Decoder-only Transformer language model. ``forward(tokens (B, T)) → LMOutput(logits (B, T, V))``."""

    objective = "causal"

    def __init__(self, cfg: GPTConfig, vocab_size: int):
        super().__init__(cfg, vocab_size, causal=True)

    def _add_head(self) -> None:
        self.lm_head = nn.Linear(self.cfg.embed_dim, self.vocab_size, bias=False)
        self.lm_head.weight = self.token_embedding.weight  # tied input/output embeddings

    def forward(self, tokens: torch.Tensor, state: object = None) -> LMOutput:
        """``state`` is accepted for interface symmetry; the GPT recomputes its context."""
        return LMOutput(self.lm_head(self.encode(tokens)), None)

    @property
    def decode_limit(self) -> int:
        """Tokens a decoding state can hold (prompt + generated) before it must be rebuilt."""
        return self.context_length

    def decode(self, tokens: torch.Tensor, state: KVCache | None = None) -> LMOutput:
        """Incremental decoding: logits for ``tokens`` (the prompt, then one token per call) given the
        KV cache of the earlier calls, and the extended cache as the new state."""
        cache = state if state is not None else KVCache(len(self.blocks))
        return LMOutput(self.lm_head(self._hidden(tokens, cache)), cache)

    def score(self, window: torch.Tensor, state: object = None, generator: torch.Generator | None = None):
        """Next-token loss over a (B, T + 1) window: (nll sum, tokens scored, state)."""
        return causal_score(self, window, state)
