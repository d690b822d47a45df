"""`lmp export`: a registered version as a Hugging Face Transformers folder or an ONNX graph."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Literal

import typer

from flows.cli.common import console, user_error
from lm.errors import DataError

LOAD_HINT = {
    "hf": (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        'model, tok = AutoModelForCausalLM.from_pretrained("{out}"), AutoTokenizer.from_pretrained("{out}")\n'
        'print(tok.decode(model.generate(**tok("ROMEO:", return_tensors="pt"), max_new_tokens=40)[0]))'
    ),
    "onnx": "see {out}/onnx.json for the graph's inputs and outputs; README.md: Use your model elsewhere",
}


def export(
    model_uri: Annotated[str, typer.Argument(help="models:/NAME@ALIAS or models:/NAME/VERSION.")],
    format: Annotated[Literal["hf", "onnx"], typer.Option("--format", help="hf (Transformers folder) or onnx.")],
    out: Annotated[Path, typer.Option("--out", help="A new folder to write (refused if it holds files).")],
) -> None:
    """Write a registered model where other tools read it: a Transformers folder (GPT → GPT-2 or GPT-NeoX layout,
    loadable with AutoModelForCausalLM / AutoTokenizer) or an ONNX graph with its tokenizer (every architecture).
    The export is loaded back and must reproduce our logits (within 1e-4) or nothing is written."""
    from flows import tracking
    from flows.registry.export import export_version

    tracking.configure_project()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise user_error(DataError(f"{out} exists and is not an empty folder: choose a new --out or remove it"))
    try:
        with tempfile.TemporaryDirectory(prefix="lmp-export-") as scratch:
            done = export_version(model_uri, format, out, Path(scratch))
    except DataError as e:
        raise user_error(e) from None
    difference = done.get("max_logit_difference")
    checked = f"; logits checked, max difference {difference:.2g}" if difference is not None else ""
    console.print(
        f"{done['model_uri']} → {done['path']} ({done.get('architecture', format)}{checked})", highlight=False
    )
    console.print(LOAD_HINT[format].format(out=done["path"]), markup=False, highlight=False, soft_wrap=True)
