"""4×4 Sudoku, the OptNet experiment (Amos & Kolter 2017, sec. 5.2).

A board is an int array (4, 4) with digits 1..4 and 0 for a blank. Its one-hot encoding is
a float tensor (4, 4, 4) with x[i, j, d-1] = 1 when cell (i, j) holds digit d (all zeros
for a blank); flattened row-major it gives the 64 variables of the QP, index 16i + 4j + d-1.

- `all_solutions()`: the 288 valid 4×4 grids.
- `generate(n, seed)`: puzzles with a unique solution and minimal clues (clues removed in a
  random order while the solution stays unique).
- `board_errors`: the error metric (a board is wrong unless its argmax is a valid Sudoku
  that keeps every clue).
- `constraint_matrix`: the true linear constraints T z = 1 of the one-hot encoding, and
  `row_space_residual` to compare a learned A with them.
- Models: `OptNetSudoku` (the QP layer of the paper), `FCSudoku`, `ConvSudoku` (baselines).
"""

import json
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

import amortized as am
from amortized.atomic import save_tensors, write_json

SIZE = 4  # board side
BOX = 2  # box side
N_VARS = SIZE**3  # 64 one-hot variables


# ---------------------------------------------------------------------------- boards


def _valid_groups(grid: np.ndarray) -> np.ndarray:
    """(N, 12, 4) digits of every row, column and box of boards (N, 4, 4)."""
    g = grid.reshape(-1, SIZE, SIZE)
    rows = g
    cols = g.transpose(0, 2, 1)
    boxes = g.reshape(-1, BOX, BOX, BOX, BOX).transpose(0, 1, 3, 2, 4).reshape(-1, SIZE, SIZE)
    return np.concatenate([rows, cols, boxes], axis=1)


def is_valid_solution(boards: np.ndarray) -> np.ndarray:
    """(N,) bool: each board (N, 4, 4) is a complete valid Sudoku (every row, column and
    2×2 box holds 1..4 exactly once)."""
    boards = np.asarray(boards)
    groups = np.sort(_valid_groups(boards), axis=-1)
    return (groups == np.arange(1, SIZE + 1)).all(axis=(-1, -2))


@lru_cache(maxsize=1)
def all_solutions() -> np.ndarray:
    """The 288 valid 4×4 Sudoku grids, (288, 4, 4) int64, in a fixed (lexicographic) order."""
    perms = (
        np.array([p for p in np.ndindex(*(SIZE,) * SIZE) if len(set(p)) == SIZE], dtype=np.int64) + 1
    )  # the 24 permutations of 1..4, one per row
    idx = np.stack(np.meshgrid(*(np.arange(len(perms)),) * SIZE, indexing="ij"), -1).reshape(-1, SIZE)
    grids = perms[idx]  # (24⁴, 4, 4): every combination of row permutations
    return np.ascontiguousarray(grids[is_valid_solution(grids)])


def _check_boards(name: str, x: np.ndarray, allow_blank: bool) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 3 or x.shape[1:] != (SIZE, SIZE):
        raise ValueError(f"{name} has shape {x.shape}; expected (N, 4, 4)")
    if not np.issubdtype(x.dtype, np.integer):
        raise TypeError(f"{name} has dtype {x.dtype}; expected integers (0 = blank, 1..4)")
    lo = 0 if allow_blank else 1
    if x.size and (x.min() < lo or x.max() > SIZE):
        raise ValueError(f"{name} has values outside {lo}..{SIZE}")
    return x.astype(np.int64)


def count_solutions(puzzles: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """(N,) number of valid grids consistent with the clues of puzzles (N, 4, 4).

    Exact: every candidate of the 288 grids is checked, so 1 means a unique solution."""
    puzzles = _check_boards("puzzles", puzzles, allow_blank=True).reshape(-1, SIZE * SIZE)
    sols = all_solutions().reshape(1, -1, SIZE * SIZE)
    out = np.empty(len(puzzles), dtype=np.int64)
    for i in range(0, len(puzzles), chunk):
        p = puzzles[i : i + chunk, None, :]
        out[i : i + chunk] = ((p == 0) | (p == sols)).all(-1).sum(-1)
    return out


def generate(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n puzzles with a unique solution and minimal clues, and their solutions.

    Each solution is drawn uniformly from the 288 grids; its 16 cells are visited once in a
    random order and a clue is removed when the puzzle keeps a unique solution (the OptNet
    protocol). One pass leaves a minimal puzzle: a clue kept at some step was needed then,
    and removing more clues never restores uniqueness. Deterministic given `seed`; all n
    puzzles advance together (16 vectorized steps). Returns puzzles, solutions (n, 4, 4)
    int64, 0 = blank.
    """
    if n < 0:
        raise ValueError("n must be non-negative")
    rng = np.random.default_rng(seed)
    grids = all_solutions()
    solutions = grids[rng.integers(len(grids), size=n)]
    order = np.argsort(rng.random((n, SIZE * SIZE)), axis=1)
    puzzles = solutions.reshape(n, -1).copy()
    rows = np.arange(n)
    for k in range(SIZE * SIZE):
        trial = puzzles.copy()
        trial[rows, order[:, k]] = 0
        unique = count_solutions(trial.reshape(n, SIZE, SIZE)) == 1
        puzzles = np.where(unique[:, None], trial, puzzles)
    return puzzles.reshape(n, SIZE, SIZE), solutions


def save_puzzles(path: Path, puzzles: np.ndarray, solutions: np.ndarray) -> None:
    """Write `puzzles` and `solutions` (N, 4, 4) to an .npz file atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, puzzles=puzzles.astype(np.int8), solutions=solutions.astype(np.int8))
    tmp.replace(path)


def load_puzzles(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read an .npz with int arrays `puzzles` and `solutions` (N, 4, 4); validated."""
    with np.load(path) as f:
        missing = {"puzzles", "solutions"} - set(f.files)
        if missing:
            raise ValueError(f"{path}: missing arrays {sorted(missing)} (has {f.files})")
        puzzles, solutions = f["puzzles"], f["solutions"]
    puzzles = _check_boards("puzzles", puzzles, allow_blank=True)
    solutions = _check_boards("solutions", solutions, allow_blank=False)
    if len(puzzles) != len(solutions):
        raise ValueError(f"{path}: {len(puzzles)} puzzles but {len(solutions)} solutions")
    return puzzles, solutions


def one_hot(boards, dtype=torch.float32, device=None) -> Tensor:
    """(N, 4, 4, 4) one-hot of boards (N, 4, 4) (numpy or tensor); a blank (0) is all zeros."""
    b = torch.as_tensor(np.asarray(boards), device=device).long()
    return torch.nn.functional.one_hot(b, SIZE + 1)[..., 1:].to(dtype)


def decode(x: Tensor) -> np.ndarray:
    """Boards (N, 4, 4) int64, digits 1..4, from scores (N, 4, 4, 4) by argmax over digits."""
    return (x.detach().argmax(-1) + 1).cpu().numpy()


def board_errors(
    pred: np.ndarray, puzzles: np.ndarray, solutions: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Per-board error flags for predicted boards pred (N, 4, 4) with digits 1..4.

    `wrong`: pred is not a valid Sudoku or changes a clue of the puzzle (N, 4, 4). Since
    every generated puzzle has a unique solution this equals `wrong_vs_label` on them, but
    it stays meaningful for puzzles with several solutions. `wrong_vs_label` (only when
    solutions are given): pred differs from the labelled solution in some cell.
    """
    pred = _check_boards("pred", pred, allow_blank=False)
    puzzles = _check_boards("puzzles", puzzles, allow_blank=True)
    if pred.shape != puzzles.shape:
        raise ValueError(f"pred {pred.shape} and puzzles {puzzles.shape} differ")
    keeps = ((puzzles == 0) | (puzzles == pred)).all(axis=(1, 2))
    out = {"wrong": ~(is_valid_solution(pred) & keeps)}
    if solutions is not None:
        solutions = _check_boards("solutions", solutions, allow_blank=False)
        out["wrong_vs_label"] = (pred != solutions).any(axis=(1, 2))
    return out


# ---------------------------------------------------------------------------- constraints


def constraint_matrix(dtype=torch.float64) -> Tensor:
    """T (64, 64): the exact-cover constraints of the one-hot encoding, T z = 1.

    Rows 0-15: cell (i, j) holds one digit; 16-31: row i holds digit d once; 32-47: column
    j holds d once; 48-63: box k holds d once. Its rank is 40 (the rows are dependent)."""
    T = torch.zeros(4, SIZE, SIZE, SIZE, SIZE, SIZE, dtype=dtype)
    for i in range(SIZE):
        for j in range(SIZE):
            for d in range(SIZE):
                k = (i // BOX) * BOX + j // BOX
                T[0, i, j, i, j, d] = 1
                T[1, i, d, i, j, d] = 1
                T[2, j, d, i, j, d] = 1
                T[3, k, d, i, j, d] = 1
    return T.reshape(N_VARS, N_VARS)


def _row_basis(M: Tensor, rtol: float) -> Tensor:
    """Orthonormal basis (r, n) of the row space of M (k, n), numerical rank by rtol·σ_max."""
    _, S, Vh = torch.linalg.svd(M, full_matrices=False)
    r = int((S > rtol * S[0]).sum()) if S.numel() and S[0] > 0 else 0
    return Vh[:r]


def row_space_residual(A: Tensor, rtol: float = 1e-6) -> dict[str, float]:
    """How close span of the rows of A (q, 64) is to the true constraints T (64, 64).

    true_in_A: ‖T − T P_A‖_F / ‖T‖_F, P_A the projector onto row(A): 0 when every true
    constraint is a combination of the learned rows. A_in_true: the same for A's rows
    against row(T): 0 when A learned nothing but true constraints. Also the numerical ranks
    and the largest principal angle (degrees) between row(T) and its projection.
    """
    A = A.detach().to(torch.float64).cpu()
    T = constraint_matrix()
    VA, VT = _row_basis(A, rtol), _row_basis(T, 1e-9)

    def resid(M: Tensor, V: Tensor) -> float:
        return float(torch.linalg.norm(M - (M @ V.T) @ V) / torch.linalg.norm(M))

    cos = torch.linalg.svdvals(VT @ VA.T) if len(VA) else torch.zeros(1, dtype=torch.float64)
    cos = torch.cat([cos, cos.new_zeros(max(0, len(VT) - len(cos)))])
    return {
        "true_in_A": resid(T, VA),
        "A_in_true": resid(A, VT),
        "rank_A": len(VA),
        "rank_true": len(VT),
        "max_angle_deg": float(torch.rad2deg(torch.arccos(cos.clamp(max=1).min()))),
    }


# ---------------------------------------------------------------------------- models


class OptNetSudoku(nn.Module):
    """The OptNet Sudoku layer (Amos & Kolter 2017, sec. 5.2): for a puzzle one-hot x,

        z*(x) = argmin_z  ½ zᵀQz − xᵀz   s.t.  z ≥ 0,  A z = b,     b = A exp(log_z0),

    with z (64,) the one-hot board, Q = q_penalty·I and G = −I, h = 0 constant, and A
    (n_eq, 64) and log_z0 (64,) learned. b = A z0 with z0 = exp(log_z0) > 0 keeps the QP
    strictly feasible (z0 is an interior point) whatever A becomes, as in the paper: it is
    `am.QPLayer`'s feasible parametrization for a constant square G (log_z0 is the layer's
    log_s0, the log-slack of z0 in z ≥ 0). A starts uniform in [0, 1) (the paper's init);
    n_eq = 40 is the rank of the true constraints. Solved by `am.solve_qp` (batched PDIPM,
    implicit backward); solver_options go to it.

    forward(x (B, 4, 4, 4)) -> z (B, 4, 4, 4). After each call, `last_status` holds the
    (B,) QPStatus of the solves.

    dtype defaults to float64: the default training was measured with it, and at a trained
    A the float32 solve's gradient dA is far from float64's (relative 4e-2 after 5 epochs,
    1.1 after 10, 4e-6 at the initialization; benchmarks/sudoku.py, solver of main 30d7a15).
    """

    def __init__(
        self,
        n_eq: int = 40,
        q_penalty: float = 0.1,
        *,
        dtype=torch.float64,
        device=None,
        generator: torch.Generator | None = None,
        **solver_options,
    ):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        if n_eq < 1:
            raise ValueError("n_eq must be at least 1")
        if q_penalty < 0:
            raise ValueError("q_penalty must be non-negative (Q = q_penalty·I; 0 makes it an LP)")
        self.n_eq, self.q_penalty, self.solver_options = n_eq, q_penalty, solver_options
        A_init = torch.rand(n_eq, N_VARS, generator=generator, dtype=dtype)  # drawn first: seeds reproduce
        self.qp = am.QPLayer(
            N_VARS,
            N_VARS,
            n_eq,
            Q=q_penalty * torch.eye(N_VARS, **kw),
            G=-torch.eye(N_VARS, **kw),
            h=torch.zeros(N_VARS, **kw),
            feasible=True,
            **kw,
            **solver_options,
        )
        with torch.no_grad():
            self.qp.A.copy_(A_init)
        self.last_status: Tensor | None = None

    @property
    def A(self) -> nn.Parameter:
        """The learned equality matrix (n_eq, 64)."""
        return self.qp.A

    @property
    def log_z0(self) -> nn.Parameter:
        """log of the learned interior point z0 (64,): b = A exp(log_z0)."""
        return self.qp.log_s0

    def forward(self, x: Tensor) -> Tensor:
        B = x.shape[0]
        sol = self.qp.solve(-x.reshape(B, N_VARS).to(self.A.dtype))
        self.last_status = sol.status
        return sol.z.reshape(x.shape).to(x.dtype)


class FCSudoku(nn.Module):
    """Fully connected baseline (OptNet's FC): 64 → hidden… → hidden reversed… → 64 with
    ReLUs, then a softmax over the digits of each cell. forward(x (B,4,4,4)) -> (B,4,4,4)."""

    def __init__(self, hidden: tuple[int, ...] = (512, 512), *, dtype=torch.float32, device=None):
        super().__init__()
        sizes = [N_VARS, *hidden, *reversed(hidden), N_VARS]
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(a, b, dtype=dtype, device=device), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])
        self.hidden = tuple(hidden)

    def forward(self, x: Tensor) -> Tensor:
        B = x.shape[0]
        return self.net(x.reshape(B, N_VARS)).reshape(x.shape).softmax(-1)


class ConvSudoku(nn.Module):
    """Convolutional baseline (OptNet's Conv): 3×3 convolutions with padding over the 4×4
    board, digits as channels, ReLUs, a last convolution to 4 channels and a softmax over
    digits. The paper uses 10 layers of 512 channels; the defaults here are smaller so it
    trains on a 2-core CPU. forward(x (B,4,4,4)) -> (B,4,4,4)."""

    def __init__(self, channels: int = 128, layers: int = 6, *, dtype=torch.float32, device=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        mods, prev = [], SIZE
        for _ in range(layers):
            mods += [nn.Conv2d(prev, channels, 3, padding=1, **kw), nn.ReLU()]
            prev = channels
        mods.append(nn.Conv2d(prev, SIZE, 3, padding=1, **kw))
        self.net = nn.Sequential(*mods)
        self.channels, self.layers = channels, layers

    def forward(self, x: Tensor) -> Tensor:
        y = self.net(x.permute(0, 3, 1, 2))  # (B, digit, row, col)
        return y.permute(0, 2, 3, 1).softmax(-1)


MODELS = {"optnet": OptNetSudoku, "fc": FCSudoku, "conv": ConvSudoku}


def model_config(model: nn.Module) -> dict:
    """JSON-able constructor arguments of a Sudoku model (for the checkpoint sidecar)."""
    if isinstance(model, OptNetSudoku):
        return {
            "model": "optnet",
            "n_eq": model.n_eq,
            "q_penalty": model.q_penalty,
            "solver_options": model.solver_options,
        }
    if isinstance(model, FCSudoku):
        return {"model": "fc", "hidden": list(model.hidden)}
    if isinstance(model, ConvSudoku):
        return {"model": "conv", "channels": model.channels, "layers": model.layers}
    raise TypeError(f"not a Sudoku model: {type(model).__name__}")


def build_model(config: dict, dtype=torch.float32, device=None) -> nn.Module:
    """Inverse of `model_config`."""
    cfg = dict(config)
    name = cfg.pop("model", None)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    if name == "optnet":
        opts = cfg.pop("solver_options", {})
        return OptNetSudoku(**cfg, dtype=dtype, device=device, **opts)
    if name == "fc":
        cfg["hidden"] = tuple(cfg["hidden"])
    return MODELS[name](**cfg, dtype=dtype, device=device)


def save_checkpoint(model: nn.Module, directory: Path, extra: dict | None = None) -> None:
    """model.safetensors + model.json (config, dtype, library version, extra) in directory,
    each written atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = next(model.parameters()).dtype
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_tensors(tensors, directory / "model.safetensors")
    meta = {
        "config": model_config(model),
        "dtype": str(dtype).removeprefix("torch."),
        "amortized_version": am.__version__,
        **(extra or {}),
    }
    write_json(directory / "model.json", meta)


def load_checkpoint(directory: Path, device=None) -> tuple[nn.Module, dict]:
    """Rebuild a model saved by `save_checkpoint`; returns (model in eval mode, metadata)."""
    from safetensors.torch import load_file

    directory = Path(directory)
    for f in ("model.json", "model.safetensors"):
        if not (directory / f).is_file():
            raise FileNotFoundError(f"{directory / f} not found: not a Sudoku checkpoint folder")
    meta = json.loads((directory / "model.json").read_text())
    dtype = getattr(torch, meta.get("dtype", "float32"))
    model = build_model(meta["config"], dtype=dtype, device=device)
    state = load_file(str(directory / "model.safetensors"), device=str(device or "cpu"))
    if isinstance(model, OptNetSudoku) and "A" in state:
        # checkpoints written before the model used am.QPLayer: A, log_z0 and constant Q, G, h
        state = {"qp.A": state["A"], "qp.log_s0": state["log_z0"]} | {
            k: v for k, v in model.state_dict().items() if k not in ("qp.A", "qp.log_s0")
        }
    model.load_state_dict(state)
    return model.eval(), meta


# ---------------------------------------------------------------------------- training


def sudoku_loss(pred: Tensor, solutions_1hot: Tensor) -> Tensor:
    """Mean squared error between predictions and one-hot solutions (both (B, 4, 4, 4))."""
    return (pred - solutions_1hot).square().mean()


@torch.no_grad()
def predict(
    model: nn.Module,
    puzzles: np.ndarray,
    batch_size: int = 500,
    device=None,
    stats: dict | None = None,
) -> np.ndarray:
    """Predicted boards (N, 4, 4) (argmax over digits), evaluated in batches. When `stats`
    is a dict and the model is an OptNet layer, stats["unsolved"] receives the number of
    QP solves that did not end SOLVED."""
    dtype = next(model.parameters()).dtype
    out, unsolved = [], 0
    for i in range(0, len(puzzles), batch_size):
        x = one_hot(puzzles[i : i + batch_size], dtype=dtype, device=device)
        out.append(decode(model(x)))
        status = getattr(model, "last_status", None)
        if status is not None:
            unsolved += int((status != int(am.QPStatus.SOLVED)).sum())
    if stats is not None:
        stats["unsolved"] = unsolved
    return np.concatenate(out) if out else np.zeros((0, SIZE, SIZE), dtype=np.int64)


def train_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    puzzles: np.ndarray,
    solutions: np.ndarray,
    batch_size: int,
    generator: torch.Generator,
    device=None,
    callback=None,
) -> dict:
    """One epoch of Adam-style training on shuffled minibatches; callback(i, n_batches, loss)
    after each batch. Returns mean loss, the predicted training boards (argmax of each
    batch's forward pass, in the original order) and the number of QP solves not SOLVED."""
    dtype = next(model.parameters()).dtype
    model.train()
    n = len(puzzles)
    perm = torch.randperm(n, generator=generator).numpy()
    n_batches = math.ceil(n / batch_size)
    pred = np.zeros((n, SIZE, SIZE), dtype=np.int64)
    total, unsolved = 0.0, 0
    for k in range(n_batches):
        idx = perm[k * batch_size : (k + 1) * batch_size]
        x = one_hot(puzzles[idx], dtype=dtype, device=device)
        y = one_hot(solutions[idx], dtype=dtype, device=device)
        z = model(x)
        loss = sudoku_loss(z, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pred[idx] = decode(z)
        total += float(loss.detach()) * len(idx)
        status = getattr(model, "last_status", None)
        if status is not None:
            unsolved += int((status != int(am.QPStatus.SOLVED)).sum())
        if callback is not None:
            callback(k, n_batches, float(loss.detach()))
    return {"loss": total / max(n, 1), "pred": pred, "unsolved": unsolved}
