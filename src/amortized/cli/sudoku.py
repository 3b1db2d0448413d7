"""`amortized sudoku …`: OptNet's 4×4 Sudoku (generate, train, eval)."""

import json
import time
import warnings
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from amortized.atomic import save_figure, write_json
from amortized.problems import sudoku as S

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="OptNet's 4×4 Sudoku: learn the rules from puzzles and solutions.",
)

DEFAULT_LR = {"optnet": 0.1, "fc": 1e-3, "conv": 1e-3}
DEFAULT_DTYPE = {"optnet": "float64", "fc": "float32", "conv": "float32"}


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
    )


@app.command()
def generate(
    out: Annotated[Path, typer.Option(help="Output .npz: int arrays puzzles, solutions (N, 4, 4).")],
    n: Annotated[int, typer.Option(min=1, help="Number of puzzles.")] = 10000,
    seed: Annotated[int, typer.Option(help="Random seed (the file depends only on n, seed).")] = 0,
) -> None:
    """Generate 4×4 puzzles with a unique solution and minimal clues."""
    t = time.perf_counter()
    puzzles, solutions = S.generate(n, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    S.save_puzzles(out, puzzles, solutions)
    clues = (puzzles > 0).sum((1, 2))
    Console().print(
        f"{n} puzzles ({clues.min()}-{clues.max()} clues, mean {clues.mean():.2f}) "
        f"written to {out} in {time.perf_counter() - t:.1f} s"
    )


def _make_model(
    name: str, dtype: torch.dtype, device: str, seed: int, q_penalty: float = 0.1
) -> torch.nn.Module:
    torch.manual_seed(seed)
    if name == "optnet":
        return S.OptNetSudoku(q_penalty=q_penalty, dtype=dtype, device=device)
    return S.MODELS[name](dtype=dtype, device=device)


def _train_one(
    name: str,
    out: Path,
    data,
    *,
    epochs: int,
    batch_size: int,
    lr: float | None,
    device: str,
    dtype: str | None,
    seed: int,
    progress: Progress,
    q_penalty: float = 0.1,
) -> dict:
    """Train one model, checkpoint it in `out`, write out/results.json and out/errors.png."""
    ptr, str_, pte, ste = data
    torch_dtype = getattr(torch, dtype or DEFAULT_DTYPE[name])
    lr = DEFAULT_LR[name] if lr is None else lr
    model = _make_model(name, torch_dtype, device, seed, q_penalty)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    history = []
    n_batches = -(-len(ptr) // batch_size)
    ep_task = progress.add_task(f"{name}: epochs", total=epochs, info="")
    b_task = progress.add_task(f"{name}: batches", total=n_batches, info="")
    t_start = time.perf_counter()
    for epoch in range(epochs):
        progress.reset(b_task, total=n_batches)
        t = time.perf_counter()

        def cb(k, nb, loss):
            progress.update(b_task, completed=k + 1, info=f"loss {loss:.4f}")

        with warnings.catch_warnings():
            # unsolved QPs are counted from their status and reported: mute the warning
            warnings.filterwarnings("ignore", message="solve_qp backward", category=RuntimeWarning)
            r = S.train_epoch(model, opt, ptr, str_, batch_size, gen, device=device, callback=cb)
        train_s = time.perf_counter() - t
        model.eval()
        stats = {}
        test_pred = S.predict(model, pte, device=device, stats=stats)
        row = {
            "epoch": epoch + 1,
            "train_loss": r["loss"],
            "train_wrong": int(S.board_errors(r["pred"], ptr, str_)["wrong"].sum()),
            "n_train": len(ptr),
            "test_wrong": int(S.board_errors(test_pred, pte, ste)["wrong"].sum()),
            "n_test": len(pte),
            "train_seconds": round(train_s, 2),
            "seconds_per_batch": round(train_s / n_batches, 4),
        }
        if name == "optnet":
            row["train_qp_unsolved"] = r["unsolved"]
            row["test_qp_unsolved"] = stats["unsolved"]
            row["row_space"] = S.row_space_residual(model.A)
        history.append(row)
        # a long run can be stopped at any time: keep the history so far on disk
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "history.json", history)
        progress.update(
            ep_task,
            advance=1,
            info=f"train {row['train_wrong']}/{len(ptr)}  test {row['test_wrong']}/{len(pte)}",
        )
    total_s = time.perf_counter() - t_start
    extra = {"lr": lr, "batch_size": batch_size, "epochs": epochs, "seed": seed}
    S.save_checkpoint(model, out, extra=extra)
    result = {
        "model": name,
        "dtype": str(torch_dtype).removeprefix("torch."),
        **extra,
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "total_seconds": round(total_s, 1),
        "history": history,
        "final": {k: history[-1][k] for k in ("train_wrong", "test_wrong", "n_train", "n_test")}
        if history
        else {},
    }
    # the pool of minimal 4×4 puzzles is small: say how many test puzzles were seen in training
    seen = {p.tobytes() for p in ptr.astype(np.int8)}
    result["test_puzzles_also_in_train"] = int(sum(p.tobytes() in seen for p in pte.astype(np.int8)))
    if name == "optnet":
        result["row_space"] = S.row_space_residual(model.A)
    write_json(out / "results.json", result)
    _plot_errors({name: history}, out / "errors.png")
    return result


def _plot_errors(histories: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, hist) in enumerate(histories.items()):
        ep = [h["epoch"] for h in hist]
        color = f"C{i}"
        ax.plot(
            ep,
            [h["train_wrong"] / h["n_train"] for h in hist],
            "--",
            color=color,
            label=f"{name} train",
        )
        ax.plot(
            ep,
            [h["test_wrong"] / h["n_test"] for h in hist],
            "-",
            color=color,
            label=f"{name} test",
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("fraction of boards wrong")
    ax.set_ylim(0, 1.02)
    ax.set_title("4×4 Sudoku: train (dashed, during the epoch) and test (solid) error", fontsize=10)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)


def _load_split(data: Path | None, n: int, n_test: int, seed: int):
    if data is None:
        puzzles, solutions = S.generate(n, seed)
    else:
        puzzles, solutions = S.load_puzzles(data)
    if not 0 < n_test < len(puzzles):
        raise typer.BadParameter(f"--n-test must be between 1 and {len(puzzles) - 1}")
    k = len(puzzles) - n_test
    return puzzles[:k], solutions[:k], puzzles[k:], solutions[k:]


@app.command()
def train(
    out: Annotated[Path, typer.Option(help="Folder for checkpoint, results.json, errors.png.")],
    model: Annotated[
        list[str] | None, typer.Option(help="optnet, fc, conv or all; repeat for several [optnet].")
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="Puzzle .npz (default: generate --n puzzles, --seed).")
    ] = None,
    n: Annotated[int, typer.Option(min=2, help="Puzzles to generate without --data.")] = 10000,
    n_test: Annotated[int, typer.Option(min=1, help="The last n_test puzzles are the test set.")] = 1000,
    epochs: Annotated[int, typer.Option(min=1)] = 10,
    batch_size: Annotated[int, typer.Option(min=1)] = 150,
    lr: Annotated[
        float | None, typer.Option(help="Adam learning rate (default: optnet 0.1, fc/conv 1e-3).")
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(help="float64 or float32 (default: optnet float64, fc/conv float32)."),
    ] = None,
    device: Annotated[str, typer.Option()] = "cpu",
    seed: Annotated[int, typer.Option()] = 0,
    threads: Annotated[int, typer.Option(help="torch threads (0: torch's default).")] = 0,
    q_penalty: Annotated[
        float, typer.Option(min=0.0, help="optnet: Q = q_penalty·I (0: the LP variant).")
    ] = 0.1,
) -> None:
    """Train OptNet's Sudoku layer and/or the FC and Conv baselines."""
    model = model or ["optnet"]
    names = sorted(S.MODELS) if "all" in model else list(dict.fromkeys(model))
    for name in names:
        if name not in S.MODELS:
            raise typer.BadParameter(f"unknown model {name!r}; expected optnet, fc, conv or all")
    if dtype not in (None, "float32", "float64"):
        raise typer.BadParameter("--dtype must be float32 or float64")
    if threads:
        torch.set_num_threads(threads)
    console = Console()
    split = _load_split(data, n, n_test, seed)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    with _progress(console) as progress:
        for name in names:
            sub = out if len(names) == 1 else out / name
            results[name] = _train_one(
                name,
                sub,
                split,
                epochs=epochs,
                batch_size=batch_size,
                lr=lr,
                device=device,
                dtype=dtype,
                seed=seed,
                progress=progress,
                q_penalty=q_penalty,
            )
    table = Table(title="4×4 Sudoku training")
    for col in ("model", "dtype", "epochs", "train wrong", "test wrong", "s/batch", "total s"):
        table.add_column(col)
    for name, r in results.items():
        h = r["history"][-1]
        table.add_row(
            name,
            r["dtype"],
            str(r["epochs"]),
            f"{h['train_wrong']}/{h['n_train']}",
            f"{h['test_wrong']}/{h['n_test']}",
            f"{h['seconds_per_batch']:.3f}",
            f"{r['total_seconds']}",
        )
    console.print(table)
    if "optnet" in results:
        rs = results["optnet"]["row_space"]
        console.print(
            f"optnet: learned A (rank {rs['rank_A']}) vs true rules (rank {rs['rank_true']}): "
            f"true rows outside span(A) {rs['true_in_A']:.3g}, A rows outside span(true) "
            f"{rs['A_in_true']:.3g}, largest principal angle {rs['max_angle_deg']:.1f}°"
        )
    if len(names) > 1:
        _plot_errors({k: v["history"] for k, v in results.items()}, out / "errors.png")
        write_json(
            out / "results.json",
            {k: {"final": v["final"], "total_seconds": v["total_seconds"]} for k, v in results.items()},
        )
    console.print(f"written to {out}")


@app.command()
def plot(
    runs: Annotated[list[Path], typer.Argument(help="Folders written by `sudoku train`.")],
    out: Annotated[Path, typer.Option(help="PNG with the train/test error of every run.")],
) -> None:
    """One plot of train/test error per epoch for several training runs."""
    histories = {}
    for run in runs:
        f = run / "results.json"
        if not f.is_file():
            raise typer.BadParameter(f"{f} not found: not a `sudoku train` folder")
        r = json.loads(f.read_text())
        if "history" not in r:
            raise typer.BadParameter(f"{f} has no history (a multi-model summary?)")
        histories[f"{r['model']} ({run.name})" if r["model"] in histories else r["model"]] = r["history"]
    out.parent.mkdir(parents=True, exist_ok=True)
    _plot_errors(histories, out)
    Console().print(f"plot written to {out}")


def _plot_boards(puzzles, pred, solutions, wrong, path: Path, k: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # show wrong boards first (they are the interesting ones), then correct ones
    idx = list(np.flatnonzero(wrong)[: k // 2]) + list(np.flatnonzero(~wrong)[:k])
    idx = idx[:k]
    cols = max(1, min(4, len(idx)))
    rows = max(1, -(-len(idx) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, idx, strict=False):
        for r in range(S.SIZE):
            for c in range(S.SIZE):
                clue = puzzles[i, r, c] > 0
                bad = solutions is not None and pred[i, r, c] != solutions[i, r, c]
                color = "red" if bad else ("black" if clue else "tab:blue")
                ax.text(
                    c + 0.5,
                    S.SIZE - r - 0.5,
                    str(pred[i, r, c]),
                    ha="center",
                    va="center",
                    fontsize=14,
                    color=color,
                    weight="bold" if clue else "normal",
                )
        for t in range(S.SIZE + 1):
            lw = 2 if t % S.BOX == 0 else 0.5
            ax.plot([0, S.SIZE], [t, t], "k", lw=lw)
            ax.plot([t, t], [0, S.SIZE], "k", lw=lw)
        ax.set_xlim(-0.1, S.SIZE + 0.1)
        ax.set_ylim(-0.1, S.SIZE + 0.1)
        ax.set_aspect("equal")
        ax.set_title(f"#{i} {'wrong' if wrong[i] else 'ok'}", color="red" if wrong[i] else "black")
    fig.suptitle("clues bold black, filled blue, wrong vs label red")
    fig.tight_layout()
    save_figure(fig, path, dpi=90)
    plt.close(fig)


@app.command("eval")
def evaluate(
    checkpoint: Annotated[Path, typer.Option(help="Folder written by `sudoku train`.")],
    puzzles: Annotated[Path, typer.Option(help=".npz with puzzles, solutions (N, 4, 4).")],
    out: Annotated[Path, typer.Option(help="Folder for results.json and boards.png.")],
    batch_size: Annotated[int, typer.Option(min=1)] = 500,
    device: Annotated[str, typer.Option()] = "cpu",
) -> None:
    """Evaluate a checkpoint: count boards whose argmax is not a valid Sudoku keeping the clues."""
    model, meta = S.load_checkpoint(checkpoint, device=device)
    pz, sol = S.load_puzzles(puzzles)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="solve_qp", category=RuntimeWarning)
        stats = {}
        pred = S.predict(model, pz, batch_size=batch_size, device=device, stats=stats)
    seconds = time.perf_counter() - t
    err = S.board_errors(pred, pz, sol)
    result = {
        "n_total": len(pz),
        "n_wrong": int(err["wrong"].sum()),
        "n_wrong_vs_label": int(err["wrong_vs_label"].sum()),
        "model": meta["config"]["model"],
        "checkpoint": str(checkpoint),
        "puzzles": str(puzzles),
        "seconds": round(seconds, 3),
    }
    if result["model"] == "optnet":
        result["qp_unsolved"] = stats["unsolved"]
        result["row_space"] = S.row_space_residual(model.A)  # learned A vs the true rules
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", result)
    if len(pz):
        _plot_boards(pz, pred, sol, err["wrong"], out / "boards.png")
    Console().print(
        f"{result['model']}: {result['n_wrong']}/{result['n_total']} wrong "
        f"({result['n_wrong_vs_label']} differ from the label); written to {out}"
    )


def sudoku_step(out: Path, progress: Progress, seed: int) -> list[dict]:
    """Demo step: a short OptNet Sudoku run (1,200 train / 300 test puzzles, one epoch).

    One epoch is 8 Adam steps: enough to cut the test MSE, far from the full run's board
    accuracy (`amortized sudoku train`, 10 epochs on 9,000 puzzles)."""
    puzzles, solutions = S.generate(1500, seed)
    ptr, str_, pte, ste = puzzles[:1200], solutions[:1200], puzzles[1200:], solutions[1200:]
    model = _make_model("optnet", torch.float64, "cpu", seed)
    opt = torch.optim.Adam(model.parameters(), lr=DEFAULT_LR["optnet"])
    x_te, y_te = S.one_hot(pte, dtype=torch.float64), S.one_hot(ste, dtype=torch.float64)

    def test_mse_and_wrong():
        with torch.no_grad():
            z = model(x_te)
        wrong = int(S.board_errors(S.decode(z), pte, ste)["wrong"].sum())
        return float(S.sudoku_loss(z, y_te)), wrong

    mse0, wrong0 = test_mse_and_wrong()
    task = progress.add_task("Sudoku: OptNet, 1 epoch", total=-(-len(ptr) // 150))
    n_batches = 0

    def cb(k, nb, loss):
        nonlocal n_batches
        n_batches += 1
        progress.advance(task)

    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="solve_qp backward", category=RuntimeWarning)
        r = S.train_epoch(model, opt, ptr, str_, 150, torch.Generator().manual_seed(seed), callback=cb)
    per_batch = (time.perf_counter() - t) / n_batches
    mse1, wrong1 = test_mse_and_wrong()
    case = "OptNet, 1200 train / 300 test, 1 epoch, float64"
    row = lambda metric, value, target="", ok=None: {
        "case": case,
        "metric": metric,
        "value": value,
        "target": target,
        "ok": ok,
    }
    rows = [
        row(
            "test MSE before -> after",
            f"{mse0:.3f} -> {mse1:.3f}",
            "falls by 2x",
            mse1 < 0.5 * mse0,
        ),
        row("test boards wrong before -> after", f"{wrong0} -> {wrong1} /{len(pte)}"),
        row("QP solves not SOLVED (train)", str(r["unsolved"]), "0", r["unsolved"] == 0),
        row("time per batch of 150 (fwd+bwd+Adam)", f"{per_batch:.3f} s", "<= 0.2 s"),
    ]
    S.save_checkpoint(model, out / "sudoku")
    return rows
