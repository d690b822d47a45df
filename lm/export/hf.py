"""Our GPT as a Hugging Face Transformers folder, and a Transformers folder on disk as our package.

Only architectures that compute *exactly* what ours computes are used, so nothing is approximated on the way:

- learned positions → GPT-2 (``GPT2LMHeadModel``): pre-norm blocks, tied embeddings, Conv1D weights (ours
  transposed), ``activation_function`` ``gelu`` (ours) or ``gelu_pytorch_tanh`` (``activation: gelu_tanh``);
- rotary positions → GPT-NeoX with ``use_parallel_residual: false`` (x + attn(ln(x)), then x + mlp(ln(x))),
  ``partial_rotary_factor: 1.0``, base 10000, tied embeddings; its fused QKV rows are per head ([q k v] per
  head), ours are [all q, all k, all v].

Without biases (``bias: false``) the Transformers layers get zero biases. An option with no exact counterpart
is refused by name (``Unsupported``). Importing reads ``config.json`` and safetensors only — no pickle, no
``transformers`` needed, no download: a path that is not a folder here fails at once.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from lm.atomic import atomic_dir
from lm.config import GPTConfig
from lm.errors import DataError
from lm.export import require, shareable
from lm.export.tokenizer import from_hf_tokenizer_json, hf_tokenizer_json
from lm.tokenizers import UNK, CharTokenizer

TOLERANCE = 1e-4
"""Largest |logit difference| an export may show against our model (fp32)."""
SUPPORTED = "gpt2 (learned positions) and gpt_neox (rotary, use_parallel_residual: false)"
LN_EPS = 1e-5  # torch's LayerNorm default, which our blocks use


class Unsupported(DataError):
    """The model has an option the target format cannot express exactly; the message names it."""


# ---------------------------------------------------------------------------------------------- names
def _layer_map(family: str, i: int) -> list[tuple[str, str, str]]:
    """(our name, theirs, how) for block ``i``; how: ``same``, ``t`` (transposed: GPT-2's Conv1D) or
    ``qkv`` (NeoX's per-head fused rows)."""
    if family == "gpt2":
        p = f"transformer.h.{i}."
        pairs = [("ln_1", "ln_1", "same"), ("attn.qkv", "attn.c_attn", "t"), ("attn.proj", "attn.c_proj", "t"),
                 ("ln_2", "ln_2", "same"), ("mlp.fc", "mlp.c_fc", "t"), ("mlp.proj", "mlp.c_proj", "t")]  # fmt: skip
    else:
        p = f"gpt_neox.layers.{i}."
        pairs = [("ln_1", "input_layernorm", "same"), ("attn.qkv", "attention.query_key_value", "qkv"),
                 ("attn.proj", "attention.dense", "same"), ("ln_2", "post_attention_layernorm", "same"),
                 ("mlp.fc", "mlp.dense_h_to_4h", "same"), ("mlp.proj", "mlp.dense_4h_to_h", "same")]  # fmt: skip
    return [
        (f"blocks.{i}.{ours}.{k}", f"{p}{theirs}.{k}", how) for ours, theirs, how in pairs for k in ("weight", "bias")
    ]


def _names(family: str, num_layers: int) -> list[tuple[str, str, str]]:
    top = "transformer." if family == "gpt2" else "gpt_neox."
    embed = [("token_embedding.weight", top + ("wte.weight" if family == "gpt2" else "embed_in.weight"), "same")]
    if family == "gpt2":
        embed.append(("position_embedding.weight", "transformer.wpe.weight", "same"))
    final = "transformer.ln_f." if family == "gpt2" else "gpt_neox.final_layer_norm."
    blocks = [n for i in range(num_layers) for n in _layer_map(family, i)]
    return embed + blocks + [(f"ln_f.{k}", final + k, "same") for k in ("weight", "bias")]


def _heads_qkv(w: torch.Tensor, num_heads: int, *, to_neox: bool) -> torch.Tensor:
    """Reorder fused QKV rows: ours [q; k; v] (each heads × hs) ⇄ NeoX's per head [q_h; k_h; v_h]."""
    rest = w.shape[1:]
    if to_neox:  # (3, nh, hs, …) → (nh, 3, hs, …)
        return w.reshape(3, num_heads, -1, *rest).transpose(0, 1).reshape(w.shape).contiguous()
    return w.reshape(num_heads, 3, -1, *rest).transpose(0, 1).reshape(w.shape).contiguous()


def _convert(w: torch.Tensor, how: str, num_heads: int, *, to_hf: bool) -> torch.Tensor:
    """One tensor between the layouts (``_layer_map``'s ``how``)."""
    if how == "t":
        return w.t().contiguous()
    return _heads_qkv(w, num_heads, to_neox=to_hf) if how == "qkv" else w.clone()


def _family(cfg: GPTConfig) -> str:
    return "gpt2" if cfg.positions == "learned" else "gpt_neox"


# ---------------------------------------------------------------------------------------------- export
def hf_config(cfg: GPTConfig, vocab_size: int) -> dict:
    """The Transformers ``config.json`` fields that make its architecture compute exactly ours."""
    common = {"vocab_size": vocab_size, "tie_word_embeddings": True, "bos_token_id": None, "eos_token_id": None,
              "pad_token_id": None, "use_cache": True}  # fmt: skip
    if _family(cfg) == "gpt2":
        return common | {
            "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": cfg.embed_dim,
            "n_layer": cfg.num_layers, "n_head": cfg.num_heads, "n_positions": cfg.context_length, "n_inner": None,
            "activation_function": "gelu" if cfg.activation == "gelu" else "gelu_pytorch_tanh",
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "layer_norm_epsilon": LN_EPS, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
        }  # fmt: skip
    if cfg.activation != "gelu":
        raise Unsupported("activation gelu_tanh with rotary positions: GPT-NeoX has no tanh-approximated GELU here")
    return common | {
        "model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"], "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "intermediate_size": 4 * cfg.embed_dim, "hidden_act": "gelu", "max_position_embeddings": cfg.context_length,
        "layer_norm_eps": LN_EPS, "use_parallel_residual": False, "attention_bias": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
        "hidden_dropout": cfg.dropout, "attention_dropout": cfg.dropout,
    }  # fmt: skip


def to_hf_state(state: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Our GPT's tensors under Transformers' names (zero biases where ours have none; tied head left out)."""
    family, out = _family(cfg), {}
    for ours, theirs, how in _names(family, cfg.num_layers):
        if ours in state:
            w = state[ours]
        elif ours.endswith(".bias"):  # bias: false
            weight = state[ours[: -len("bias")] + "weight"]
            w = torch.zeros(weight.shape[0], dtype=weight.dtype)
        else:
            raise KeyError(f"the model has no tensor {ours}")
        w = w.detach().float().cpu()
        out[theirs] = _convert(w, how, cfg.num_heads, to_hf=True)
    return out


def _refuse(config: dict) -> GPTConfig:
    """The package's GPT config, or Unsupported naming why it has no exact Transformers architecture."""
    from lm.package import LANGUAGE_MODEL, task_name

    task = task_name(config)
    if task != LANGUAGE_MODEL:
        raise Unsupported(f"a {task} model has no Transformers export here; export it with --format onnx")
    kind = config["model"]["kind"]
    if kind == "lstm":
        raise Unsupported("Transformers has no LSTM language model architecture; export it with --format onnx")
    if kind == "encoder":
        raise Unsupported(
            "the masked-LM encoder has no exact Transformers counterpart: RobertaPreLayerNormForMaskedLM normalises "
            "the embeddings and puts a dense + GELU + LayerNorm transform before its output layer, which ours does "
            "not have (ours: final LayerNorm, then the tied embedding); export it with --format onnx"
        )
    return GPTConfig.model_validate(config["model"])


def _special(tok) -> dict[str, str]:
    """The special-token roles a tokenizer's vocabulary has, for ``AutoTokenizer``."""
    if isinstance(tok, CharTokenizer):
        return {"unk_token": UNK}
    vocab = tok.hf.get_vocab()
    roles = {"unk_token": "<unk>"} if "<unk>" in vocab else {}
    return roles | ({"eos_token": "<|endoftext|>"} if "<|endoftext|>" in vocab else {})


@dataclass(frozen=True)
class Exported:
    path: str
    architecture: str
    max_logit_difference: float | None


def export_hf(loaded, out_dir: Path, *, check: bool = True, provenance: dict | None = None) -> Exported:
    """Write ``loaded`` (``lm.package.Loaded``) as a Transformers folder at ``out_dir`` (a new folder).

    With ``check`` the folder is loaded back with ``AutoModelForCausalLM`` / ``AutoTokenizer`` and must give
    our logits (within ``TOLERANCE``) and our token ids, else nothing is left at ``out_dir``."""
    cfg = _refuse(loaded.config)
    transformers = require("transformers", "export to Hugging Face Transformers")
    transformers.utils.logging.set_verbosity_error()  # its progress bars and notices are not ours to print
    transformers.utils.logging.disable_progress_bar()
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DataError(f"{out_dir} exists and is not empty: choose a new --out folder or remove it")
    fields = hf_config(cfg, loaded.config["vocab_size"])
    config = transformers.AutoConfig.for_model(**fields)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    missing, unexpected = model.load_state_dict(to_hf_state(loaded.model.state_dict(), cfg), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the token embedding
    if missing or unexpected:
        raise RuntimeError(
            f"weights do not map onto {fields['model_type']}: missing {missing}, unexpected {unexpected}"
        )
    from tokenizers import Tokenizer as HFTokenizer

    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=HFTokenizer.from_str(hf_tokenizer_json(loaded.tokenizer)),
        model_max_length=cfg.context_length, clean_up_tokenization_spaces=False, **_special(loaded.tokenizer),
    )  # fmt: skip
    gen = loaded.config.get("generation") or {}
    generation = transformers.GenerationConfig(
        do_sample=True, temperature=gen.get("temperature", 1.0), top_k=gen.get("top_k") or 0,
        max_new_tokens=gen.get("max_new_tokens", 100), bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    difference = None
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        generation.save_pretrained(tmp)
        hf_tok.save_pretrained(tmp)
        (tmp / "lm_pipelines.json").write_text(
            json.dumps({"source": provenance or {}, "config": loaded.config}, indent=2)
        )
        if check:
            difference = _check(loaded, Path(tmp), transformers)
        shareable(tmp)
    return Exported(str(out_dir), fields["architectures"][0], difference)


def _check(loaded, folder: Path, transformers) -> float:
    """Max |logit difference| of the folder loaded back by Transformers against ours; tokens must agree."""
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    text = "To be, or not to be: that is the question.\nWhence is that knocking?"
    if tok(text)["input_ids"] != loaded.tokenizer.encode(text):
        raise RuntimeError("the exported tokenizer encodes text differently from ours")
    ids = torch.randint(0, loaded.config["vocab_size"], (2, min(loaded.model.context_length, 24)),
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    with torch.no_grad():
        ours = loaded.model.float().eval()(ids).logits
        diff = float((theirs(ids).logits - ours).abs().max())
    if not diff <= TOLERANCE:
        raise RuntimeError(f"Transformers' logits differ from ours by {diff:.3g} (> {TOLERANCE}): export refused")
    return diff


# ---------------------------------------------------------------------------------------------- import
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(str(folder / shard)).items()}
    pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt*")]
    hint = f" (it has {', '.join(pickled)}: pickle files, which lm-pipelines never loads)" if pickled else ""
    raise DataError(
        f"{folder}: no model.safetensors{hint}; save the model with save_pretrained(DIR, safe_serialization=True)"
    )


def gpt_config_of(hf: dict, folder: Path) -> GPTConfig:
    """Our GPTConfig for a Transformers config.json, or Unsupported naming the option that has no match."""
    kind = hf.get("model_type")

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise Unsupported(f"{folder}/config.json: {what} has no exact counterpart in our GPT")

    if kind == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        need(act in ("gelu", "gelu_new", "gelu_pytorch_tanh"), f"activation_function {act!r}")
        need(hf.get("n_inner") in (None, 4 * hf["n_embd"]), f"n_inner {hf.get('n_inner')} (ours is 4 × n_embd)")
        need(hf.get("scale_attn_weights", True), "scale_attn_weights: false")
        need(not hf.get("scale_attn_by_inverse_layer_idx"), "scale_attn_by_inverse_layer_idx: true")
        need(not hf.get("add_cross_attention"), "add_cross_attention: true")
        eps, dims = hf.get("layer_norm_epsilon", 1e-5), (hf["n_layer"], hf["n_head"], hf["n_embd"], hf["n_positions"])
        fields = {"positions": "learned", "activation": "gelu" if act == "gelu" else "gelu_tanh"}
        dropout = hf.get("resid_pdrop", 0.0)
    elif kind == "gpt_neox":
        rope = hf.get("rope_parameters") or {}
        pct = rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25))
        base = rope.get("rope_theta", hf.get("rotary_emb_base", 10000))
        need(not hf.get("use_parallel_residual", True), "use_parallel_residual: true (ours adds attention, then MLP)")
        need(pct == 1.0, f"rotary on {pct:g} of each head (ours rotates all of it)")
        need(float(base) == 10000.0, f"rotary base {base}")
        need(rope.get("rope_type", "default") == "default", f"rope_type {rope.get('rope_type')!r}")
        need(hf.get("hidden_act", "gelu") == "gelu", f"hidden_act {hf.get('hidden_act')!r}")
        need(hf["intermediate_size"] == 4 * hf["hidden_size"], "intermediate_size other than 4 × hidden_size")
        eps = hf.get("layer_norm_eps", 1e-5)
        dims = (hf["num_hidden_layers"], hf["num_attention_heads"], hf["hidden_size"], hf["max_position_embeddings"])
        fields, dropout = {"positions": "rotary"}, hf.get("hidden_dropout", 0.0)
    else:
        raise Unsupported(f"{folder}/config.json: model_type {kind!r}; supported: {SUPPORTED}")
    need(abs(eps - LN_EPS) < 1e-12, f"layer norm epsilon {eps}")
    layers, heads, width, context = dims
    return GPTConfig(num_layers=layers, num_heads=heads, embed_dim=width, context_length=context,
                     dropout=dropout, **fields)  # fmt: skip


def from_hf_state(tensors: dict[str, torch.Tensor], cfg: GPTConfig, family: str, folder: Path) -> dict:
    """Transformers' tensors under our names; the head must be the token embedding (ours is tied)."""
    out, biases = {}, []
    for ours, theirs, how in _names(family, cfg.num_layers):
        if theirs not in tensors:
            raise DataError(f"{folder}: the weights have no tensor {theirs!r}")
        w = tensors[theirs].float()
        out[ours] = _convert(w, how, cfg.num_heads, to_hf=False)
        biases += [w] if ours.endswith(".bias") else []
    embed = out["token_embedding.weight"]
    head = next((tensors[k] for k in ("lm_head.weight", "embed_out.weight") if k in tensors), None)
    if head is not None and not torch.equal(head.float(), embed):
        raise Unsupported(f"{folder}: the output layer is not tied to the token embedding (ours always is)")
    out["lm_head.weight"] = embed
    if all(not b.any() for b in biases):  # an export of a bias-free model: drop the zero biases
        out = {k: v for k, v in out.items() if not k.endswith(".bias")}
    return out


@dataclass(frozen=True)
class Imported:
    config: dict
    """Our package config.json: ``model`` and ``vocab_size``."""
    architecture: str


def import_hf(path: str, dest: Path) -> Imported:
    """Convert the Transformers folder ``path`` into our package files (model.safetensors, config.json,
    tokenizer.json) at ``dest`` (replaced atomically)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        hub = (
            " lm-pipelines never downloads from the Hub at run time: "
            if HUB_ID.match(path) and not folder.exists()
            else " "
        )
        raise DataError(
            f"hf:{path} is not a folder on this machine.{hub}download it first (e.g. `hf download {path} "
            f"--local-dir DIR`) and use init_from: hf:DIR"
        )  # fmt: skip
    for name in ("config.json", "tokenizer.json"):
        if not (folder / name).is_file():
            hint = " (save the tokenizer as a fast one: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR))"
            raise DataError(f"{folder}: missing {name}{hint if name == 'tokenizer.json' else ''}")
    hf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    cfg = gpt_config_of(hf, folder)
    state = from_hf_state(_read_tensors(folder), cfg, hf["model_type"], folder)
    tok = from_hf_tokenizer_json((folder / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = state["token_embedding.weight"].shape[0]
    if tok.vocab_size != vocab:
        raise DataError(f"{folder}: tokenizer.json has {tok.vocab_size} ids but the weights have {vocab} rows")
    cfg = cfg.model_copy(update={"bias": "blocks.0.attn.qkv.bias" in state})
    config = {"model": cfg.model_dump(mode="json"), "vocab_size": vocab}
    from lm.models import build_model

    model = build_model(cfg, vocab)
    model.load_state_dict(state, strict=True)  # every tensor where our model has it, nothing left over
    from safetensors.torch import save_model

    with atomic_dir(Path(dest)) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tok.save(tmp / "tokenizer.json")
    return Imported(config, hf["architectures"][0] if hf.get("architectures") else hf["model_type"])
