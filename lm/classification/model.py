"""A text classifier: a language-model backbone, pooled features, dropout and a linear head.

Texts longer than a Transformer backbone's context are read as consecutive windows of that length
whose features are pooled together (an LSTM reads the whole text). Padding never counts: pooling
uses the true lengths, and a bidirectional encoder is told not to attend to it.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from lm.classification.config import HeadConfig
from lm.classification.examples import LabelledBatch
from lm.config import ModelConfig
from lm.models import build_model


class Classifier(nn.Module):
    """``forward(ids (B, T), lengths (B,)) → logits (B, classes)``; ``score(batch)`` is its training loss."""

    objective = "classification"
    unused_parameters = True  # the backbone's LM head (and frozen layers) get no gradient

    def __init__(
        self, backbone: nn.Module, head: HeadConfig, num_classes: int, class_weights: list[float] | None = None
    ):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.backbone, self.head_cfg, self.num_classes = backbone, head, num_classes
        self.bidirectional = backbone.objective == "mlm"
        if head.pooling == "cls" and not self.bidirectional:
            raise ValueError(
                f"head.pooling 'cls' reads the first position, which a causal {type(backbone).__name__} computes "
                "from the first token alone; use 'last' or 'mean'"
            )
        self.context_length, self.vocab_size = backbone.context_length, backbone.vocab_size
        with torch.no_grad():
            self.feature_dim = int(backbone.encode(torch.zeros(1, 1, dtype=torch.long)).shape[-1])
        self.dropout = nn.Dropout(head.dropout)
        self.head = nn.Linear(self.feature_dim, num_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        weights = torch.tensor(class_weights if class_weights is not None else [1.0] * num_classes)
        if weights.shape != (num_classes,) or not bool((weights > 0).all()):
            raise ValueError(f"class_weights must be {num_classes} positive numbers, got {class_weights}")
        self.register_buffer("class_weights", weights.float(), persistent=False)
        if head.freeze_layers:
            self.freeze(head.freeze_layers)

    # ------------------------------------------------------------ freezing

    def backbone_layers(self) -> list[list[nn.Parameter]]:
        """The backbone's parameters by depth: [embeddings, layer 1, …, layer N]."""
        return self.backbone.layers()

    def freeze(self, n: int) -> None:
        """Stop training the embeddings and the first ``n`` layers (they keep their loaded values)."""
        layers = self.backbone_layers()
        if n > len(layers) - 1:
            raise ValueError(f"head.freeze_layers is {n} but the backbone has {len(layers) - 1} layers")
        for group in layers[: n + 1]:
            for p in group:
                p.requires_grad_(False)

    # ------------------------------------------------------------ forward

    def features(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, C) of right-padded ``ids`` (B, T) with true ``lengths`` (B,)."""
        B, T = ids.shape
        mask = torch.arange(T, device=ids.device)[None, :] < lengths[:, None]  # (B, T) real tokens
        limit = self.backbone.max_length
        if limit is None or T <= limit:
            hidden = self.backbone.encode(ids, key_mask=mask) if self.bidirectional else self.backbone.encode(ids)
        else:  # consecutive windows of the backbone's context, encoded as one batch
            W = math.ceil(T / limit)
            windows = F.pad(ids, (0, W * limit - T)).view(B * W, limit)
            if self.bidirectional:
                key_mask = F.pad(mask, (0, W * limit - T)).view(B * W, limit).clone()
                key_mask[:, 0] = True  # an all-padding window must attend somewhere; its features are not pooled
                hidden = self.backbone.encode(windows, key_mask=key_mask)
            else:
                hidden = self.backbone.encode(windows)
            hidden = hidden.reshape(B, W * limit, -1)[:, :T]
        match self.head_cfg.pooling:
            case "mean":
                return (hidden * mask[..., None]).sum(1) / lengths[:, None].clamp(min=1)
            case "last":
                return hidden[torch.arange(B, device=ids.device), (lengths - 1).clamp(min=0)]
            case "cls":
                return hidden[:, 0]

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(ids, lengths)))

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode(tokens)

    def score(self, batch: LabelledBatch, state: object = None, generator: torch.Generator | None = None):
        """Class-weighted cross-entropy summed over the batch, the summed weight, and no state."""
        logits = self(batch.ids, batch.lengths).float()
        weights = self.class_weights[batch.labels]
        nll = (F.cross_entropy(logits, batch.labels, reduction="none") * weights).sum()
        return nll, weights.sum(), None

    def num_parameters(self, *, non_embedding: bool = False) -> int:
        return self.backbone.num_parameters(non_embedding=non_embedding) + sum(
            p.numel() for p in self.head.parameters()
        )

    def flops_per_token(self) -> float:
        return self.backbone.flops_per_token()


def build_classifier(
    model_cfg: ModelConfig,
    vocab_size: int,
    head: HeadConfig,
    num_classes: int,
    class_weights: list[float] | None = None,
) -> Classifier:
    """A classifier on a freshly initialised backbone (load pretrained weights into ``.backbone`` after)."""
    return Classifier(build_model(model_cfg, vocab_size), head, num_classes, class_weights)


def resolve_class_weights(setting, labels: list[str], train_counts: dict[str, int]) -> list[float] | None:
    """``head.class_weights`` as one weight per class (None: unweighted)."""
    if setting == "none":
        return None
    if setting == "balanced":
        total, k = sum(train_counts.values()), len(labels)
        return [total / (k * max(1, train_counts.get(name, 0))) for name in labels]
    unknown = sorted(set(setting) - set(labels))
    if unknown:
        raise ValueError(f"head.class_weights names {unknown}, which are not classes ({labels})")
    return [float(setting.get(name, 1.0)) for name in labels]
