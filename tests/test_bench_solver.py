"""`linmix bench solver`: the solvers against their convergence theory, the gradients against Lemma 2 and
the exact solve, the sampled systems, the report and the command line."""

import json
import subprocess
import sys

import pytest
import torch

from linmix.bench import solver as study
from linmix.bench.report import write_json
from linmix.bench.solvers import (
    cg_implicit_solve,
    chebyshev_bound,
    chebyshev_iterates,
    conjugate_gradient,
    gradient_descent,
    gradient_descent_bound,
    kappa_bound,
    matvec,
    nesterov,
    unrolled_cg_solve,
    unrolled_chebyshev_solve,
)
from linmix.cli import main
from linmix.ops.gated_kalman.solve import token_exact_solve, token_solve

TINY = dict(batch_size=1, seq_len=48, heads=2, head_dim=12, stride=8, iters=16)
TINY_FLAGS = ["--batch-size", "1", "--seq-len", "48", "--heads", "2", "--head-dim", "12", "--stride", "8",
              "--iters", "16", "--device", "cpu", "--no-progress"]


def _gram(rank: int, dim: int, batch: int, seed: int) -> torch.Tensor:
    """Normalised Gram states ``[batch, dim, dim]`` of ``rank`` random unit keys each (float64)."""
    keys = torch.randn(batch, rank, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    keys = keys / keys.norm(dim=-1, keepdim=True)
    gram = keys.mT @ keys
    return gram / gram.norm(dim=(-2, -1), keepdim=True)


def _endpoint_system(dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``H = e1 e1^T`` (``||H||_F = 1``): ``A`` has the eigenvalues ``mu`` and ``L`` of the bounds themselves,
    and ``q`` weighs both, so a method's worst case over ``[mu, L]`` is what it achieves."""
    H = torch.zeros(1, dim, dim, dtype=torch.float64)
    H[0, 0, 0] = 1.0
    q = torch.zeros(1, dim, dtype=torch.float64)
    q[0, :2] = 2 ** -0.5
    return H, q


def _relative_residuals(H, q, ridge, iterates):
    A = H + ridge * torch.eye(H.shape[-1], dtype=H.dtype)
    return [((matvec(A)(x) - q).norm(dim=-1) / q.norm(dim=-1)) for x in iterates]


def test_bounds_of_the_spec():
    """kappa <= 51 at ridge 0.02, and 30 Chebyshev steps give the spec's measured 3.2e-4."""
    assert kappa_bound(0.02) == pytest.approx(51.0)
    assert chebyshev_bound(0.02, 30) == pytest.approx(3.2e-4, rel=0.05)


@pytest.mark.parametrize("ridge", [0.02, 0.1])
def test_chebyshev_meets_its_bound_and_attains_it_at_the_endpoints(ridge):
    """||r_n|| / ||q|| <= 1 / T_{n+1}(1/rho) on random systems; equality where A has the eigenvalues mu and L
    (so the iterates are the scaled Chebyshev polynomials of degree n + 1, omega_0 = 2)."""
    iters = 30
    for rank in (1, 5, 40):
        H = _gram(rank, 16, 8, seed=rank)
        q = torch.nn.functional.normalize(torch.randn(8, 16, dtype=torch.float64), dim=-1)
        iterates = study.solver_iterates(H, q, ridge, iters)["chebyshev"]
        exact = torch.linalg.solve(H + ridge * torch.eye(16, dtype=torch.float64), q)
        for n, (residual, x) in enumerate(zip(_relative_residuals(H, q, ridge, iterates), iterates)):
            bound = chebyshev_bound(ridge, n) * (1 + 1e-9) + 1e-14
            assert residual.max() <= bound, (rank, n)
            assert ((x - exact).norm(dim=-1) / exact.norm(dim=-1)).max() <= bound, (rank, n)
    H, q = _endpoint_system(16)
    iterates = study.solver_iterates(H, q, ridge, iters)["chebyshev"]
    attained = torch.stack(_relative_residuals(H, q, ridge, iterates))[:, 0]
    expected = torch.tensor([chebyshev_bound(ridge, n) for n in range(iters + 1)], dtype=torch.float64)
    torch.testing.assert_close(attained, expected, rtol=1e-9, atol=1e-15)


def test_gradient_descent_contracts_by_rho_per_step_and_nesterov_is_faster():
    """The step 2/(L+mu) from x_0 = h q leaves the error polynomial (1 - h A)^(n+1): rho^(n+1) exactly at the
    endpoints; Nesterov's momentum does far better there."""
    ridge, iters = 0.02, 60
    H, q = _endpoint_system(8)
    F = torch.ones(1, dtype=torch.float64)
    A = H + ridge * torch.eye(8, dtype=torch.float64)
    gd = torch.stack(_relative_residuals(H, q, ridge, gradient_descent(matvec(A), q, ridge * F, (1 + ridge) * F,
                                                                       iters)))[:, 0]
    expected = torch.tensor([gradient_descent_bound(ridge, n) for n in range(iters + 1)], dtype=torch.float64)
    torch.testing.assert_close(gd, expected, rtol=1e-9, atol=0.0)
    accelerated = _relative_residuals(H, q, ridge, nesterov(matvec(A), q, ridge * F, (1 + ridge) * F, iters))
    assert accelerated[-1] < 1e-3 < 0.05 < gd[-1]


def test_conjugate_gradient_converges_in_as_many_steps_as_distinct_eigenvalues():
    """Exact arithmetic (float64 here): D steps on any SPD system, 3 on H of rank 2 (A has 3 distinct
    eigenvalues); the A-norm error never grows; extra steps after convergence stay put."""
    dim, ridge = 8, 0.02
    full = _gram(12, dim, 4, seed=1)
    rank2 = _gram(2, dim, 4, seed=2)
    q = torch.nn.functional.normalize(torch.randn(4, dim, dtype=torch.float64), dim=-1)
    for H, converged_at in ((full, dim), (rank2, 3)):
        A = H + ridge * torch.eye(dim, dtype=torch.float64)
        iterates = conjugate_gradient(matvec(A), q, dim + 4)
        residuals = torch.stack(_relative_residuals(H, q, ridge, iterates))
        assert residuals[converged_at:].max() < 1e-10
        assert residuals[converged_at - 1].min() > 1e-6
        errors = [x - torch.linalg.solve(A, q) for x in iterates]
        energy = torch.stack([(e * matvec(A)(e)).sum(-1) for e in errors])
        assert (energy[1:] <= energy[:-1] * (1 + 1e-9) + 1e-24).all()


def test_chebyshev_iterates_end_where_the_gka_solve_does():
    """The recorded run is solve.chebyshev's: its last iterate is token_solve's x."""
    H = _gram(30, 16, 6, seed=3).float()
    q = torch.nn.functional.normalize(torch.randn(6, 16), dim=-1)
    torch.testing.assert_close(study.solver_iterates(H, q, 0.02, 30)["chebyshev"][-1], token_solve(H, q, 0.02, 30),
                               rtol=0, atol=0)
    assert len(chebyshev_iterates(lambda x: x, q, 0.02, 0)) == 1


def _grads(solve, H, q, c):
    return study._gradients(solve, H, q, c)


def test_lemma_2_implicit_chebyshev_is_the_gradient_of_the_iteration_in_q():
    """The Chebyshev map is a symmetric matrix polynomial, so the implicit dq equals autograd through the steps
    (to rounding) and lies within the iteration's bound of the exact gradient; dH gets no such guarantee."""
    ridge, iters = 0.02, 12
    H = _gram(20, 16, 6, seed=4)
    q = torch.nn.functional.normalize(torch.randn(6, 16, dtype=torch.float64), dim=-1)
    c = torch.randn(6, 16, dtype=torch.float64)
    implicit = _grads(lambda H_, q_: token_solve(H_, q_, ridge, iters), H, q, c)
    unrolled = _grads(lambda H_, q_: unrolled_chebyshev_solve(H_, q_, ridge, iters), H, q, c)
    exact = _grads(lambda H_, q_: token_exact_solve(H_, q_, ridge), H, q, c)
    torch.testing.assert_close(implicit[0], unrolled[0], rtol=1e-12, atol=1e-12)
    relative = (implicit[0] - exact[0]).norm(dim=-1) / exact[0].norm(dim=-1)
    assert relative.max() <= chebyshev_bound(ridge, iters)
    assert relative.max() > 1e-3 * chebyshev_bound(ridge, iters)  # the iteration error, not rounding
    assert ((implicit[1] - unrolled[1]).norm(dim=(-2, -1)) / unrolled[1].norm(dim=(-2, -1))).min() > 1e-8


def test_cg_gradients_are_exact_once_cg_has_converged():
    """After D steps (float64) CG is the exact solve, and so are its implicit and unrolled gradients, q and H
    (lambda differentiated through ||H||_F)."""
    ridge, dim = 0.05, 8
    H = _gram(12, dim, 4, seed=5)
    q = torch.nn.functional.normalize(torch.randn(4, dim, dtype=torch.float64), dim=-1)
    c = torch.randn(4, dim, dtype=torch.float64)
    exact = _grads(lambda H_, q_: token_exact_solve(H_, q_, ridge), H, q, c)
    for solve in (cg_implicit_solve, unrolled_cg_solve):
        dq, dH = _grads(lambda H_, q_: solve(H_, q_, ridge, dim + 2), H, q, c)
        torch.testing.assert_close(dq, exact[0], rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(dH, exact[1], rtol=1e-8, atol=1e-10)


def test_sampled_systems_are_the_normalised_grams_at_every_stride_th_position(monkeypatch):
    """H at t = s-1, 2s-1, ... is the Gram of the first t+1 keys over its Frobenius norm, whatever the grouping."""
    plan = study.plan_solver_study(**TINY, device="cpu")
    H, q, c = (torch.cat(parts) for parts in zip(*study.sample_systems(plan)))
    assert H.shape == (plan.systems, 12, 12) and plan.systems == 2 * 6 and q.shape == c.shape == (12, 12)
    keys = torch.randn(2, 48, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    keys = keys / keys.norm(dim=-1, keepdim=True)
    for sequence in range(2):
        for index, t in enumerate(range(7, 48, 8)):
            gram = keys[sequence, : t + 1].T @ keys[sequence, : t + 1]
            torch.testing.assert_close(H[sequence * 6 + index], gram / gram.norm(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(12, dtype=torch.float64))
    monkeypatch.setattr(study, "GROUP_SYSTEMS", 1)  # one sequence per group
    regrouped = [torch.cat(parts) for parts in zip(*study.sample_systems(plan))]
    for mine, theirs in zip((H, q, c), regrouped):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_measured_group_in_fp64():
    """In float64 the LU solve's residual is rounding, CG has converged by D steps, Chebyshev meets its bound on
    every system, and every gradient error is a finite number per system."""
    plan = study.plan_solver_study(**TINY, device="cpu")
    H, q, c = next(study.sample_systems(plan))
    measured = study.measure_group(H, q, c, 0.02, 16, torch.float64)
    assert measured["residual"]["lu"].max() < 1e-13
    assert measured["residual"]["cg"][12:].max() < 1e-9
    bound = torch.tensor([chebyshev_bound(0.02, n) for n in range(17)], dtype=torch.float64)
    assert (measured["error"]["chebyshev"] <= bound[:, None] * (1 + 1e-9)).all()
    for key in ("exact_q", "exact_H", "iteration_q", "iteration_H"):
        for values in measured[key].values():
            assert values.shape == (H.shape[0],) and torch.isfinite(values).all()
    assert measured["exact_q"]["cg_implicit"].max() < 1e-9  # D = 12 < 16 steps: converged


def test_report_fields_and_json(tmp_path):
    report = study.run_solver_study(study.plan_solver_study(**TINY, device="cpu"))
    assert set(report) >= {"machine", "settings", "residual", "error", "chebyshev_bound", "gradients", "summary"}
    assert set(report["residual"]) == {*study.SOLVERS, "lu"} == set(report["error"])
    for spread in report["residual"].values():
        assert set(spread) == {"median", "p10", "p90", "max"}
    assert all(len(report["residual"][name]["median"]) == 17 for name in study.SOLVERS)
    assert all(spread["p10"][n] <= spread["median"][n] <= spread["p90"][n] <= spread["max"][n]
               for spread in report["residual"].values() for n in range(len(spread["median"])))
    assert set(report["gradients"]) == set(study.GRADIENT_METHODS)
    assert set(report["gradients"]["cg_implicit"]) == set(study.GRADIENT_REFERENCES)
    assert set(report["gradients"]["cg_implicit"]["exact"]) == {"q", "H"}
    assert report["summary"]["lowest_median_residual_at_last_iteration"] in study.SOLVERS
    assert report["settings"]["systems"] == 12 and report["settings"]["dtype"] == "fp32"
    saved = json.loads(write_json(report, tmp_path / "solver.json").read_text())
    assert saved["chebyshev_bound"] == pytest.approx(report["chebyshev_bound"])
    table = study.format_solver_report(report)
    assert "Chebyshev bound" in table and "n=16" in table and "CG, implicit" in table


def test_stays_at_or_below():
    assert study._stays_at_or_below([3, 1, 2, 1], [2, 2, 1, 1]) == 3
    assert study._stays_at_or_below([3, 1, 1, 1], [2, 2, 1, 1]) == 1
    assert study._stays_at_or_below([1, 1, 2], [2, 2, 1]) is None


def test_cli_writes_table_json_and_figures(tmp_path, capsys):
    out = tmp_path / "solver.json"
    assert main(["bench", "solver", *TINY_FLAGS, "--json", str(out), "--plot-dir", str(tmp_path / "figures")]) == 0
    printed = capsys.readouterr().out
    assert "relative residual" in printed and "conjugate gradient" in printed
    assert json.loads(out.read_text())["settings"]["stride"] == 8
    for name in study.FIGURES:
        assert (tmp_path / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["bench", "solver", *TINY_FLAGS, "--iters", "2", "--plot-dir", "none"]) == 0
    assert "wrote" not in capsys.readouterr().out


def test_solver_help_imports_no_torch():
    code = ("import sys, contextlib, io\nfrom linmix.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try: main(['bench', 'solver', '--help'])\n    except SystemExit: pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)
