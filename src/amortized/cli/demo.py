"""`amortized demo`: every capability that has landed, end to end on built-in data."""

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from amortized.atomic import write_json
from amortized.cli.amortize import amortize_step
from amortized.cli.deq import deq_step
from amortized.cli.qp_demo import qp_step
from amortized.cli.sudoku import sudoku_step

# Each step: (title, function(out_dir, progress) -> list of result rows (dicts)).
STEPS = [
    ("Batched differentiable QP vs Clarabel and finite differences", qp_step),
    ("Deep equilibrium classifier on digits (Anderson + implicit backward)", deq_step),
    ("OptNet learns 4x4 Sudoku (short run)", sudoku_step),
    ("Amortized optimization: QP proxy, VAE inference, sphere", amortize_step),
]


def demo(
    out: Path = typer.Option(Path("demo-out"), help="Folder for results.json and plots."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Run each capability end to end and print one results table."""
    console = Console()
    out.mkdir(parents=True, exist_ok=True)
    results, rows = {}, []
    with Progress(console=console, transient=False) as progress:
        for title, step in STEPS:
            t0 = time.perf_counter()
            step_rows = step(out, progress, seed)
            results[title] = {"rows": step_rows, "seconds": round(time.perf_counter() - t0, 2)}
            rows += [(title, r) for r in step_rows]
    table = Table(title="amortized demo")
    for col in ("case", "metric", "value", "target", "ok"):
        table.add_column(col)
    shown = None
    for title, r in rows:
        if title != shown:  # one section per step, headed by its title
            if shown is not None:
                table.add_section()
            table.add_row(f"[bold]{title}", "", "", "", "")
            shown = title
        ok = r.get("ok")
        table.add_row(
            r["case"],
            r["metric"],
            r["value"],
            r.get("target", ""),
            "" if ok is None else ("[green]yes" if ok else "[red]no"),
        )
    console.print(table)
    path = out / "results.json"
    write_json(path, results)
    console.print(f"results written to {path}")
    if any(r.get("ok") is False for _, r in rows):
        raise typer.Exit(1)
