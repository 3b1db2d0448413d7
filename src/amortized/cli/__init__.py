"""The `amortized` command line."""

import typer

from amortized.cli import amortize, deq, sudoku
from amortized.cli.demo import demo

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Differentiable and amortized optimization: solve, differentiate, amortize.",
)


@app.callback()
def main() -> None:
    """amortized: solve, differentiate and amortize optimization problems."""


app.command()(demo)
app.add_typer(sudoku.app, name="sudoku")
app.add_typer(deq.app, name="deq")
app.add_typer(amortize.app, name="amortize")
