"""The command line: ``sora pretrain | embed | info``. Errors a user can fix print as one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import click
import typer

from sora.errors import SoraError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Sora: denoising-autoencoder text representations from your own unlabeled text.")


def _overrides(pairs: list[str] | None, **flags: Any) -> dict[str, Any]:
    """Flags that were given (not None) plus ``--set key=value`` pairs, as dotted recipe keys."""
    out = {k: v for k, v in flags.items() if v is not None}
    for pair in pairs or []:
        if "=" not in pair:
            raise SoraError(f"--set {pair!r}: expected key=value, e.g. --set model.dim=256")
        key, value = pair.split("=", 1)
        out[key.strip()] = value
    return out


@app.command()
def pretrain(
    recipe: Annotated[Path | None, typer.Argument(help="YAML recipe; flags override it")] = None,
    train: Annotated[str | None, typer.Option(help="training text: a file or a directory with train.*")] = None,
    validation: Annotated[str | None, typer.Option(help="validation text file")] = None,
    column: Annotated[str | None, typer.Option(help="text column (JSONL/CSV/TSV/Parquet)")] = None,
    format: Annotated[str | None, typer.Option(help="jsonl|csv|tsv|txt|parquet (default: extension)")] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="run directory")] = None,
    backbone: Annotated[str | None, typer.Option(help="local HF encoder directory (domain adaptation)")] = None,
    max_steps: Annotated[int | None, typer.Option(help="optimizer steps")] = None,
    minutes: Annotated[float | None, typer.Option(help="wall-clock budget in minutes")] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    lr: Annotated[float | None, typer.Option()] = None,
    max_length: Annotated[int | None, typer.Option(help="tokens per text")] = None,
    vocab_size: Annotated[int | None, typer.Option(help="size of the tokenizer trained on the corpus")] = None,
    device: Annotated[str | None, typer.Option(help="auto|cpu|cuda")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    save_every: Annotated[int | None, typer.Option(help="checkpoint every N steps")] = None,
    resume: Annotated[bool, typer.Option(help="continue from the run's last checkpoint")] = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    set_: Annotated[list[str] | None, typer.Option("--set", help="any recipe key, e.g. model.dim=256")] = None,
) -> None:
    """Pretrain the denoising autoencoder on unlabeled text."""
    from sora.config import load_recipe
    from sora.train.pretrain import run_pretrain

    overrides = _overrides(
        set_, **{"data.train": train, "data.validation": validation, "data.column": column, "data.format": format,
                 "output": output, "model.backbone": backbone, "train.max_steps": max_steps,
                 "train.max_minutes": minutes, "data.batch_size": batch_size, "train.lr": lr,
                 "data.max_length": max_length, "tokenizer.vocab_size": vocab_size, "train.device": device,
                 "train.seed": seed, "train.save_every": save_every,
                 "train.progress": None if progress else False})
    summary = run_pretrain(load_recipe(recipe, overrides), resume=resume)
    if summary.get("history"):
        last = summary["history"][-1]
        typer.echo("final " + ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k != "step"))
    typer.echo(f"model: {summary['output']}/model  ({summary['steps']} steps, {summary['tokens']:,} tokens, "
               f"{summary['elapsed_s']} s)")


@app.command()
def embed(
    checkpoint: Annotated[str, typer.Argument(help="checkpoint or run directory")],
    input: Annotated[str, typer.Argument(help="texts: JSONL/CSV/TSV/TXT/Parquet")],
    output: Annotated[Path, typer.Option("--output", "-o", help=".npy or .parquet")],
    column: Annotated[str, typer.Option()] = "text",
    format: Annotated[str | None, typer.Option()] = None,
    batch_size: Annotated[int, typer.Option()] = 64,
    normalize: Annotated[bool, typer.Option(help="L2-normalise the vectors")] = False,
    device: Annotated[str, typer.Option()] = "cpu",
) -> None:
    """Embed texts into sentence vectors (.npy, or .parquet with the texts beside them)."""
    import numpy as np

    import sora
    from sora.data import read_texts

    suffix = output.suffix.lower()
    if suffix not in (".npy", ".parquet"):
        raise SoraError(f"--output {output}: use a .npy or .parquet file")
    model = sora.load(checkpoint, device=device)
    texts = list(read_texts(input, column, format))
    vectors = model.embed(texts, batch_size=batch_size, normalize=normalize, progress=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".npy":
        np.save(output, vectors)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"text": texts, "embedding": list(vectors)})
        pq.write_table(table, output)
    typer.echo(f"{len(texts)} vectors of dim {vectors.shape[1]} -> {output}")


@app.command()
def info(
    checkpoint: Annotated[str, typer.Argument(help="checkpoint or run directory")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Describe a checkpoint: architecture, size, training and metadata."""
    import sora

    details = sora.load(checkpoint).info()
    if as_json:
        typer.echo(json.dumps(details, indent=2))
        return
    for key, value in details.items():
        typer.echo(f"{key:>15}: {value}")


def main() -> None:
    try:
        app(standalone_mode=False)
    except SoraError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except click.exceptions.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
