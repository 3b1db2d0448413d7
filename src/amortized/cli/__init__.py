"""The `amortized` command line."""

import typer

from amortized.cli.demo import demo

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Differentiable and amortized optimization: solve, differentiate, amortize.")


@app.callback()
def main() -> None:
    """amortized: solve, differentiate and amortize optimization problems."""


app.command()(demo)

from amortized.cli import deq as _deq  # noqa: E402

app.add_typer(_deq.app, name="deq")
