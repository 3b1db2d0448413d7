"""Fast CI versions of `amortized amortize {qp-proxy,vae,sphere}` (toy budgets)."""

import json
import math

import pytest
from typer.testing import CliRunner

from amortized.cli import app
from amortized.cli.amortize import qp_time_to_match

runner = CliRunner()


def _run(tmp_path, *args):
    res = runner.invoke(app, ["amortize", *args, "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    return json.loads((tmp_path / "results.json").read_text())


def test_qp_proxy_cli(tmp_path):
    r = _run(
        tmp_path,
        "qp-proxy",
        "--steps",
        "20",
        "--n-examples",
        "120",
        "--trace-size",
        "4",
        "--trace-iters",
        "12",
    )["qp_proxy"]
    assert r["n_test"] == 9 and r["solver"]["max_abs_diff_vs_clarabel"] < 1e-6
    for name in (
        "regression",
        "objective_penalty",
        "dc3",
        "ours_active_set",
        "ours_warm_started_exact",
        "active_set_cold_start",
    ):
        m = r["methods"][name]
        for k in (
            "objective_gap_rel",
            "max_ineq_violation",
            "max_eq_violation",
            "time_per_instance_s",
        ):
            assert math.isfinite(m[k])
    assert r["methods"]["dc3"]["max_eq_violation"] < 1e-8  # completion makes equalities exact
    ours = r["methods"]["ours_active_set"]
    assert max(ours["max_eq_violation"], ours["max_ineq_violation"]) <= 1e-6
    assert abs(ours["objective_gap_rel"]) <= 1e-6  # KKT-checked or solved exactly
    assert r["solver"]["time_per_instance_s"] > 0 and len(r["solver_trace"]) == 12
    warm = r["methods"]["ours_warm_started_exact"]
    assert max(warm["max_eq_violation"], warm["max_ineq_violation"]) <= 1e-6
    # Exact methods are matched only by the solver's converged iterates; inexact ones earlier.
    assert ours["time_to_match_per_instance_s"] is not None and ours["trace_batch_size"] == 4
    assert r["methods"]["regression"]["speedup_time_to_match"] is not None
    assert (tmp_path / "qp_regression.safetensors").exists()
    assert (tmp_path / "qp_proxy_time_vs_gap.png").stat().st_size > 0


def test_vae_cli(tmp_path):
    args = ["--steps", "20", "--adam-iters", "30", "--optimum-iters", "10", "--refine-steps", "2"]
    r = _run(tmp_path, "vae", *args, "--elbo-samples", "20")["vae"]
    for k in ("encoder_elbo", "adam_elbo_final", "optimum_elbo", "speedup_full_run"):
        assert math.isfinite(r[k])
    assert r["adam_time_s"] > r["encoder_time_s"] > 0
    assert r["speedup_full_run"] == r["adam_time_s"] / r["encoder_time_s"]
    assert r["speedup_time_to_match"] is None or r["speedup_time_to_match"] <= r["speedup_full_run"]
    assert r["semi_amortized_gap_closed"]["K"] == 2 and "fraction" in r["semi_amortized_gap_closed"]
    assert r["n_test"] == 500 and r["n_train"] == 1297
    assert (tmp_path / "vae_elbo_vs_time.png").exists() and (tmp_path / "vae_samples.png").exists()


def test_sphere_cli(tmp_path):
    r = _run(tmp_path, "sphere", "--steps", "30", "--n-test", "40")["sphere"]
    assert 0 <= r["median_geodesic_error_rad"] <= math.pi
    assert r["objective_gap"] >= -1e-9  # the reference optimum is never beaten by the model
    assert r["fine_tuned"]["objective_gap"] <= r["objective_gap"] + 1e-12  # descent steps help
    assert (tmp_path / "sphere_predictions.png").exists()
    assert r["context_frame"] == "rotated" and r["batch_size"] == 1024
    meta = json.loads((tmp_path / "sphere_model.safetensors.json").read_text())["meta"]
    assert meta["context_frame"] == "rotated"  # what benchmarks/amortize.py rebuilds the model from


def test_sphere_models_behind_each_frame():
    import torch

    from amortized.cli.amortize import FRAMES, sphere_model
    from amortized.problems.sphere import SphereProblem

    x = SphereProblem().sample(5, torch.Generator().manual_seed(0))
    for frame in FRAMES:
        y = sphere_model(frame).double()(x)
        torch.testing.assert_close(y.norm(dim=-1), torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="frame"):
        sphere_model("polar")


def test_qp_time_to_match_by_hand():
    trace = [
        {"time_per_instance_s": 1.0, "objective_gap_rel": 0.5, "max_violation": 1e-3},
        {"time_per_instance_s": 2.0, "objective_gap_rel": 1e-3, "max_violation": 1e-10},
        {"time_per_instance_s": 3.0, "objective_gap_rel": 0.0, "max_violation": 1e-14},
    ]
    assert qp_time_to_match(trace, 0.01, 1e-6) == 2.0
    assert qp_time_to_match(trace, -0.6, 1.0) == 1.0  # |gap| is compared
    assert qp_time_to_match(trace, 0.0, 0.0) == 3.0  # exact methods: below 1e-9 counts as exact
    assert qp_time_to_match(trace[:2], 0.0, 0.0) is None


def test_vae_checkpoint_round_trip(tmp_path):
    import torch

    from amortized.cli.amortize import train_vae

    path = tmp_path / "vae.safetensors"
    _, enc, dec, _, x_test, _, _ = train_vae(steps=2, batch_size=8, save=path)
    _, enc2, dec2, _, _, hist, _ = train_vae(steps=2, load=path)
    assert hist == [] and not list(tmp_path.glob("*.tmp"))
    with torch.no_grad():
        assert torch.equal(enc(x_test), enc2(x_test))
        assert torch.equal(dec(enc(x_test)[:, :10]), dec2(enc2(x_test)[:, :10]))
    with pytest.raises(ValueError, match="seed"):
        train_vae(steps=0, seed=1, load=path)
    # a file from before the encoder output log σ² (no "q" in its meta) is refused, not misread
    side = path.with_name(path.name + ".json")
    meta = json.loads(side.read_text())
    del meta["meta"]["q"]
    side.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="train it again"):
        train_vae(steps=0, load=path)
