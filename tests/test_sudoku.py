"""4×4 Sudoku (OptNet sec. 5.2): generator, error metric, constraints, models, CLI."""

import json
import warnings

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from amortized.cli import app
from amortized.problems import sudoku as S


def _count_backtracking(board: np.ndarray, limit: int = 2) -> int:
    """Independent reference: count completions of a 4×4 board by plain backtracking."""
    b = board.copy()

    def ok(i, j, d):
        bi, bj = 2 * (i // 2), 2 * (j // 2)
        return d not in b[i] and d not in b[:, j] and d not in b[bi : bi + 2, bj : bj + 2]

    def rec():
        zeros = np.argwhere(b == 0)
        if len(zeros) == 0:
            return 1
        i, j = zeros[0]
        n = 0
        for d in range(1, 5):
            if ok(i, j, d):
                b[i, j] = d
                n += rec()
                b[i, j] = 0
                if n >= limit:
                    break
        return n

    return rec()


# a valid grid and a puzzle of it with two solutions (swap digits 1 and 2 everywhere)
GRID = np.array([[1, 2, 3, 4], [3, 4, 1, 2], [2, 1, 4, 3], [4, 3, 2, 1]])


def test_all_solutions_are_the_288_grids():
    g = S.all_solutions()
    assert g.shape == (288, 4, 4)
    assert S.is_valid_solution(g).all()
    assert len(np.unique(g.reshape(288, -1), axis=0)) == 288
    assert _count_backtracking(np.zeros((4, 4), dtype=np.int64), limit=1000) == 288


def test_generator_unique_minimal_deterministic():
    puzzles, solutions = S.generate(60, seed=3)
    assert puzzles.shape == solutions.shape == (60, 4, 4)
    assert S.is_valid_solution(solutions).all()
    assert ((puzzles == 0) | (puzzles == solutions)).all()
    for p in puzzles:
        assert _count_backtracking(p) == 1  # unique solution
        for i, j in np.argwhere(p > 0):  # minimal: every clue is needed
            q = p.copy()
            q[i, j] = 0
            assert _count_backtracking(q) >= 2
    again, _ = S.generate(60, seed=3)
    other, _ = S.generate(60, seed=4)
    np.testing.assert_array_equal(puzzles, again)
    assert (puzzles != other).any()
    np.testing.assert_array_equal(S.count_solutions(puzzles), 1)


def test_board_errors_on_hand_made_boards():
    puzzle = GRID.copy()
    puzzle[puzzle <= 2] = 0  # only the 3s and 4s are given: 1 and 2 can be swapped
    assert _count_backtracking(puzzle) == 2
    swapped = np.where(GRID == 1, 2, np.where(GRID == 2, 1, GRID))
    broken = GRID.copy()
    broken[0, [0, 1]] = broken[0, [1, 0]]  # row stays a permutation, columns break
    clue_changed = np.array([[2, 1, 4, 3], [4, 3, 2, 1], [1, 2, 3, 4], [3, 4, 1, 2]])  # valid grid
    assert S.is_valid_solution(np.stack([GRID, swapped, clue_changed])).all()
    assert not S.is_valid_solution(broken[None])[0]
    pred = np.stack([GRID, swapped, broken, clue_changed])
    puzzles = np.stack([puzzle] * 4)
    labels = np.stack([GRID] * 4)
    err = S.board_errors(pred, puzzles, labels)
    # the other valid completion is right by the rules but differs from the label
    assert err["wrong"].tolist() == [False, False, True, True]
    assert err["wrong_vs_label"].tolist() == [False, True, True, True]
    with pytest.raises(ValueError, match="outside"):
        S.board_errors(np.zeros((1, 4, 4), dtype=int), puzzles[:1])


def test_constraint_matrix_and_row_space_residual():
    T = S.constraint_matrix()
    z = S.one_hot(S.all_solutions(), dtype=torch.float64).reshape(288, 64)
    torch.testing.assert_close(z @ T.T, torch.ones(288, 64, dtype=torch.float64))
    assert torch.linalg.matrix_rank(T) == 40
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(40, 64, generator=gen, dtype=torch.float64) @ T  # spans row(T)
    r = S.row_space_residual(mix)
    assert r["true_in_A"] < 1e-10 and r["A_in_true"] < 1e-10 and r["rank_A"] == 40
    assert r["max_angle_deg"] < 1e-3
    rand = S.row_space_residual(torch.rand(40, 64, generator=gen, dtype=torch.float64))
    assert rand["true_in_A"] > 0.1 and rand["A_in_true"] > 0.1
    # 39 true directions: exactly one true direction is missing
    part = S.row_space_residual(mix[:39])
    assert part["rank_A"] == 39 and part["A_in_true"] < 1e-10 and part["true_in_A"] > 1e-3


def _true_init_model(dtype):
    """OptNet layer holding the true constraints (40 independent rows) and z0 = 1/4."""
    T = S.constraint_matrix(dtype)
    Qr, R = torch.linalg.qr(T.T)
    m = S.OptNetSudoku(dtype=dtype)
    with torch.no_grad():
        m.A.copy_(Qr[:, :40].T)  # orthonormal basis of row(T)
        m.log_z0.fill_(np.log(0.25))
    return m


def test_optnet_forward_matches_clarabel():
    cp = pytest.importorskip("cvxpy")
    puzzles, solutions = S.generate(40, seed=1)
    m = _true_init_model(torch.float64)
    x = S.one_hot(puzzles, dtype=torch.float64)
    with torch.no_grad():
        z = m(x).reshape(40, 64)
    assert (m.last_status == 0).all()
    A, b = m.A.detach().numpy(), (m.A @ m.log_z0.exp()).detach().numpy()
    for i in range(3):
        v = cp.Variable(64)
        cp.Problem(
            cp.Minimize(0.05 * cp.sum_squares(v) - x[i].reshape(64).numpy() @ v),
            [v >= 0, A @ v == b],
        ).solve(solver="CLARABEL", tol_feas=1e-10, tol_gap_abs=1e-10, tol_gap_rel=1e-10)
        np.testing.assert_allclose(z[i].numpy(), v.value, atol=1e-6)
    # feasible: z >= 0 and A z = b, so every cell's digit weights sum to 1 under the true rules
    assert z.min() > -1e-8
    torch.testing.assert_close(z.reshape(40, 16, 4).sum(-1), torch.ones(40, 16, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float64])
def test_optnet_gradient_matches_finite_differences(dtype):
    puzzles, solutions = S.generate(6, seed=2)
    gen = torch.Generator().manual_seed(0)
    m = S.OptNetSudoku(dtype=dtype, generator=gen)
    x, y = S.one_hot(puzzles, dtype=dtype), S.one_hot(solutions, dtype=dtype)
    loss = S.sudoku_loss(m(x), y)
    gA, gz = torch.autograd.grad(loss, [m.A, m.log_z0])
    dA = torch.randn(m.A.shape, generator=gen, dtype=dtype)
    dz = torch.randn(m.log_z0.shape, generator=gen, dtype=dtype)
    h = 1e-5
    A0, z0 = m.A.detach().clone(), m.log_z0.detach().clone()

    def f(t):
        with torch.no_grad():
            m.A.copy_(A0 + t * dA)
            m.log_z0.copy_(z0 + t * dz)
            return float(S.sudoku_loss(m(x), y))

    fd = (f(h) - f(-h)) / (2 * h)
    ad = float((gA * dA).sum() + (gz * dz).sum())
    assert abs(fd - ad) <= 1e-5 * (1 + abs(fd)), (fd, ad)


SHORT_RUNS = {  # model, dtype, Adam lr, epochs: small enough for CI, long enough to learn
    "optnet": (lambda: S.OptNetSudoku(), torch.float64, 0.1, 1),
    "optnet-lp": (lambda: S.OptNetSudoku(q_penalty=0.0), torch.float64, 0.1, 1),  # Q = 0
    "fc": (lambda: S.FCSudoku(), torch.float32, 3e-3, 10),
    "conv": (lambda: S.ConvSudoku(channels=32, layers=3), torch.float32, 3e-3, 10),
}


@pytest.mark.parametrize("name", list(SHORT_RUNS))
def test_short_training_lowers_loss(name):
    puzzles, solutions = S.generate(600, seed=5)
    ptr, str_, pev, sev = puzzles[:450], solutions[:450], puzzles[450:], solutions[450:]
    torch.manual_seed(0)
    make, dtype, lr, epochs = SHORT_RUNS[name]
    model = make()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = S.one_hot(pev, dtype=dtype), S.one_hot(sev, dtype=dtype)

    def held_out_loss():
        with torch.no_grad():
            return float(S.sudoku_loss(model(x), y))

    before = held_out_loss()
    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(epochs):
            r = S.train_epoch(model, opt, ptr, str_, 150, gen)
    after = held_out_loss()
    assert after < 0.8 * before, (before, after)
    assert r["unsolved"] == 0
    assert r["pred"].shape == (450, 4, 4) and set(np.unique(r["pred"])) <= {1, 2, 3, 4}


@pytest.mark.parametrize("name", ["optnet", "fc", "conv"])
def test_checkpoint_round_trip(tmp_path, name):
    torch.manual_seed(0)
    model = S.MODELS[name]()
    S.save_checkpoint(model, tmp_path, extra={"note": 1})
    loaded, meta = S.load_checkpoint(tmp_path)
    assert meta["note"] == 1 and meta["config"]["model"] == name
    x = S.one_hot(S.generate(5, seed=0)[0], dtype=next(model.parameters()).dtype)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(FileNotFoundError):
        S.load_checkpoint(tmp_path / "missing")


def test_checkpoint_from_before_qplayer_loads(tmp_path):
    """OptNet checkpoints written before the model used am.QPLayer (keys A, log_z0, Q, G, h)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = S.OptNetSudoku()
    S.save_checkpoint(model, tmp_path)
    old = {"A": model.A.detach(), "log_z0": model.log_z0.detach() - 1}
    old |= {"Q": 0.1 * torch.eye(64, dtype=torch.float64), "G": -torch.eye(64, dtype=torch.float64)}
    save_file(old | {"h": torch.zeros(64, dtype=torch.float64)}, str(tmp_path / "model.safetensors"))
    loaded, _ = S.load_checkpoint(tmp_path)
    torch.testing.assert_close(loaded.A, model.A)
    torch.testing.assert_close(loaded.log_z0, model.log_z0 - 1)
    torch.testing.assert_close(loaded.qp.data()[4], model.A @ (model.log_z0 - 1).exp())


def test_load_puzzles_rejects_bad_files(tmp_path):
    f = tmp_path / "bad.npz"
    np.savez(f, puzzles=np.zeros((2, 4, 4), dtype=int))
    with pytest.raises(ValueError, match="solutions"):
        S.load_puzzles(f)
    np.savez(f, puzzles=np.zeros((2, 4, 4), dtype=int), solutions=np.full((2, 4, 4), 5))
    with pytest.raises(ValueError, match="outside"):
        S.load_puzzles(f)
    np.savez(f, puzzles=np.zeros((2, 4, 4)), solutions=np.ones((2, 4, 4)))
    with pytest.raises(TypeError, match="integers"):
        S.load_puzzles(f)
    np.savez(f, puzzles=np.zeros((2, 3, 3), dtype=int), solutions=np.ones((2, 3, 3), dtype=int))
    with pytest.raises(ValueError, match="shape"):
        S.load_puzzles(f)


def test_cli_generate_train_eval(tmp_path):
    runner = CliRunner()
    data = tmp_path / "p.npz"
    r = runner.invoke(app, ["sudoku", "generate", "--out", str(data), "--n", "200", "--seed", "7"])
    assert r.exit_code == 0, r.output
    puzzles, solutions = S.load_puzzles(data)
    ref_p, ref_s = S.generate(200, seed=7)
    np.testing.assert_array_equal(puzzles, ref_p)
    np.testing.assert_array_equal(solutions, ref_s)

    ck = tmp_path / "ck"
    r = runner.invoke(
        app,
        [
            "sudoku",
            "train",
            "--model",
            "optnet",
            "--model",
            "fc",
            "--out",
            str(ck),
            "--data",
            str(data),
            "--n-test",
            "50",
            "--epochs",
            "1",
        ],
    )
    assert r.exit_code == 0, r.output
    assert (ck / "errors.png").stat().st_size > 0
    res = json.loads((ck / "optnet" / "results.json").read_text())
    hist = res["history"]
    train_set = {p.tobytes() for p in puzzles[:150]}
    assert res["test_puzzles_also_in_train"] == sum(p.tobytes() in train_set for p in puzzles[150:])
    assert hist[0]["n_train"] == 150 and hist[0]["n_test"] == 50
    assert 0 <= hist[0]["row_space"]["true_in_A"] <= 1

    png = tmp_path / "all.png"
    r = runner.invoke(app, ["sudoku", "plot", str(ck / "optnet"), str(ck / "fc"), "--out", str(png)])
    assert r.exit_code == 0, r.output
    assert png.stat().st_size > 0

    # eval on a tiny hand-made file (int32, a puzzle with two solutions) and on the generated one
    tiny = tmp_path / "tiny.npz"
    two = GRID.copy()
    two[two <= 2] = 0
    np.savez(
        tiny,
        puzzles=np.stack([two, puzzles[0]]).astype(np.int32),
        solutions=np.stack([GRID, solutions[0]]).astype(np.int32),
    )
    for name in ("optnet", "fc"):
        for f in (tiny, data):
            out = tmp_path / f"ev-{name}-{f.stem}"
            r = runner.invoke(
                app,
                [
                    "sudoku",
                    "eval",
                    "--checkpoint",
                    str(ck / name),
                    "--puzzles",
                    str(f),
                    "--out",
                    str(out),
                ],
            )
            assert r.exit_code == 0, r.output
            res = json.loads((out / "results.json").read_text())
            model, _ = S.load_checkpoint(ck / name)
            pz, sol = S.load_puzzles(f)
            err = S.board_errors(S.predict(model, pz), pz, sol)
            assert res["n_total"] == len(pz)
            assert res["n_wrong"] == int(err["wrong"].sum())
            assert res["n_wrong_vs_label"] == int(err["wrong_vs_label"].sum())
            assert (out / "boards.png").stat().st_size > 0
            assert res.get("qp_unsolved", 0) == 0
            assert (name == "optnet") == ("row_space" in res)
    r = runner.invoke(app, ["sudoku", "train", "--model", "nope", "--out", str(ck)])
    assert r.exit_code != 0
