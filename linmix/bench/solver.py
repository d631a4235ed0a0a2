"""The Gated KalmaNet solver study (spec/gated_kalmanet.md §4 "Solver study", Fig. 1 of the paper).

Systems: random unit keys ``k`` and queries ``q`` (``batch_size x heads`` independent sequences of
``seq_len`` tokens, head dim ``D``); the Gram state ``G_t = sum_{i<=t} k_i k_i^T`` normalised to
``H_t = G_t / ||G_t||_F``, and the system ``A_t x = q_t`` with ``A_t = H_t + ridge ||H_t||_F I``
(``= H_t + ridge I``), the GKA solve of that token. Every ``G_t`` of every token does not fit in
memory at the paper's size, so the study samples the positions ``t = s-1, 2s-1, ...`` (0-based,
``s = stride``: the state after every ``s``-th key), ``seq_len // stride`` per sequence, and builds
their states by a cumsum over the segments between them, in float64.

Measured per system, for gradient descent (step ``2/(L+mu)``), Nesterov, conjugate gradient and
the GKA Chebyshev iteration (``linmix.bench.solvers``) run in ``dtype`` against the number ``n`` of
products with ``A``: the relative residual ``||A x_n - q|| / ||q||`` and the relative error
``||x_n - x*|| / ||x*||``, both in float64 against the float64 system, ``x*`` its float64
``torch.linalg.solve``. The same LU solve done in ``dtype`` is the floor that precision allows.

Gradient stability: for a random cotangent ``c`` and the loss ``<x(H, q), c>`` (``x`` of
``A(H) = H + ridge ||H||_F I``, ``lambda`` differentiated through ``||H||_F`` as in the layer), the
relative error of ``dL/dq`` and of the symmetric part of ``dL/dH`` after ``iters`` steps, in
``dtype``, of CG with implicit differentiation, Chebyshev with implicit differentiation
(``solve.token_solve``, the GKA backward) and Chebyshev differentiated through its unrolled steps,
against two references
(``GRADIENT_REFERENCES``): the float64 exact solve differentiated by autograd, and the float64
derivative of the finite iteration the method runs (autograd through the same solver's unrolled
steps), which tells how far the backward is from the true gradient of its own forward.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from linmix.bench.machine import machine_info, machine_line
from linmix.bench.plot import DPI, PANEL_SIZE
from linmix.bench.solvers import (
    cg_implicit_solve,
    chebyshev_bound,
    chebyshev_iterates,
    conjugate_gradient,
    gradient_descent,
    kappa_bound,
    matvec,
    nesterov,
    ridge_system,
    unrolled_cg_solve,
    unrolled_chebyshev_solve,
)
from linmix.ops.gated_kalman.solve import step_size, token_exact_solve, token_matrix, token_solve

SOLVERS = {"gd": "gradient descent", "nesterov": "Nesterov AGD", "cg": "conjugate gradient", "chebyshev": "Chebyshev"}
GRADIENT_METHODS = {"cg_implicit": "CG, implicit", "chebyshev_implicit": "Chebyshev, implicit",
                    "chebyshev_unrolled": "Chebyshev, autograd through the steps"}
GRADIENT_REFERENCES = {
    "exact": "the float64 exact solve (linalg.solve) differentiated by autograd",
    "iteration": "autograd through the same solver's unrolled steps in float64, the derivative of the function "
                 "the forward computes",
}
DTYPES = {"fp32": torch.float32, "fp64": torch.float64}
DEFAULT_STRIDE = 64
REPORT_ITERS = (5, 10, 20, 30)  # the table's columns (those <= iters, and iters itself)
GROUP_SYSTEMS = 2048  # systems measured together (whole sequences at a time); bounds the memory
FIGURES = ("solver_residuals.png", "solver_gradients.png")


@dataclass
class SolverStudyPlan:
    """A validated solver-study request.

    Attributes:
        batch_size, seq_len, heads, head_dim: the paper's B, T, heads and D.
        ridge: ``a`` of ``A = H + a ||H||_F I``.
        iters: products with ``A`` of every solver (iterations ``0..iters`` are measured).
        stride: the sampled positions are ``t = stride-1, 2 stride-1, ...``.
        seed: seed of the keys, queries and cotangents (drawn on the CPU: the same systems on any device).
        dtype: "fp32" or "fp64", the precision the solvers run in.
        device: where they run.
    """

    batch_size: int = 8
    seq_len: int = 2048
    heads: int = 8
    head_dim: int = 128
    ridge: float = 0.02
    iters: int = 30
    stride: int = DEFAULT_STRIDE
    seed: int = 0
    dtype: str = "fp32"
    device: torch.device = torch.device("cpu")

    @property
    def positions(self) -> int:
        """Sampled positions per sequence."""
        return self.seq_len // self.stride

    @property
    def systems(self) -> int:
        """Sampled systems in all."""
        return self.batch_size * self.heads * self.positions


def plan_solver_study(*, batch_size: int = 8, seq_len: int = 2048, heads: int = 8, head_dim: int = 128,
                      ridge: float = 0.02, iters: int = 30, stride: int = DEFAULT_STRIDE, seed: int = 0,
                      dtype: str = "fp32", device: str | None = None) -> SolverStudyPlan:
    """Check a solver-study request and resolve its device.

    Args: the fields of ``SolverStudyPlan``; ``device`` None for cuda when available, else cpu.

    Returns:
        the plan.

    Raises:
        ValueError: a bad value, naming the command-line option it came from.
    """
    for option, value, low in (("--batch-size", batch_size, 1), ("--seq-len", seq_len, 1), ("--heads", heads, 1),
                               ("--head-dim", head_dim, 1), ("--iters", iters, 1), ("--stride", stride, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{option} must be an integer >= {low}, got {value!r}")
    if stride > seq_len:
        raise ValueError(f"--stride {stride} is longer than --seq-len {seq_len}: no position would be sampled")
    if not 0 < ridge < float("inf"):
        raise ValueError(f"--ridge must be a finite number > 0, got {ridge!r}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    resolved = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    return SolverStudyPlan(batch_size, seq_len, heads, head_dim, ridge, iters, stride, seed, dtype, resolved)


def sample_systems(plan: SolverStudyPlan) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The study's systems, a group of whole sequences at a time, in float64 on the plan's device.

    Yields:
        ``H [n, D, D]`` (normalised Gram states at the sampled positions, sequence-major), the unit
        queries ``q [n, D]`` of those positions and the gradient cotangents ``c [n, D]``.
    """
    sequences, T, D, s, P = plan.batch_size * plan.heads, plan.seq_len, plan.head_dim, plan.stride, plan.positions
    generator = torch.Generator().manual_seed(plan.seed)
    keys = torch.randn(sequences, T, D, generator=generator, dtype=torch.float64)
    keys = keys / keys.norm(dim=-1, keepdim=True)  # [S, T, D]
    queries = torch.randn(sequences, P, D, generator=generator, dtype=torch.float64)
    queries = queries / queries.norm(dim=-1, keepdim=True)  # [S, P, D]
    cotangents = torch.randn(sequences, P, D, generator=generator, dtype=torch.float64)  # [S, P, D]
    per_group = max(1, GROUP_SYSTEMS // P)
    for first in range(0, sequences, per_group):
        group = slice(first, first + per_group)
        k = keys[group, : P * s].to(plan.device).view(-1, P, s, D)  # [g, P, s, D]
        gram = torch.einsum("gpsd,gpse->gpde", k, k).cumsum(dim=1)  # [g, P, D, D], G at t = s-1, 2s-1, ...
        H = gram / gram.square().sum(dim=(-2, -1), keepdim=True).sqrt()
        yield (H.reshape(-1, D, D), queries[group].to(plan.device).reshape(-1, D),
               cotangents[group].to(plan.device).reshape(-1, D))


def solver_iterates(H: torch.Tensor, q: torch.Tensor, ridge: float, iters: int) -> dict[str, list[torch.Tensor]]:
    """Every solver's iterates ``x_0 .. x_iters`` on ``A = H + ridge ||H||_F I``, in the dtype of ``H`` and ``q``.

    Args:
        H: Gram states ``[n, D, D]``.
        q: right-hand sides ``[n, D]``.
        ridge: the ridge ratio; the bounds are ``mu = lambda``, ``L = lambda + ||H||_F``.
        iters: products with ``A``.

    Returns:
        ``{solver: [x_0, ..., x_iters]}``, each ``[n, D]``, solvers as in ``SOLVERS``.
    """
    A, F = ridge_system(H, ridge)  # [n, D, D], [n]
    mu, L = ridge * F, ridge * F + F
    apply = matvec(A)
    h = step_size(F, ridge)
    return {
        "gd": gradient_descent(apply, q, mu, L, iters),
        "nesterov": nesterov(apply, q, mu, L, iters),
        "cg": conjugate_gradient(apply, q, iters),
        "chebyshev": chebyshev_iterates(matvec(token_matrix(H, h, ridge)), h[:, None] * q, ridge, iters),
    }


def _relative_to(A: torch.Tensor, q: torch.Tensor, exact: torch.Tensor,
                 X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Relative residuals and errors ``[m, n]`` of solutions ``X [m, n, D]`` of ``A [n, D, D] x = q [n, D]``."""
    X = X.to(torch.float64).permute(1, 2, 0)  # [n, D, m]
    residual = (A @ X - q[..., None]).norm(dim=1) / q.norm(dim=1, keepdim=True)  # [n, m]
    error = (X - exact[..., None]).norm(dim=1) / exact.norm(dim=1, keepdim=True)
    return residual.T, error.T


def _gradients(solve, H: torch.Tensor, q: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``d<solve(H, q), c>`` with respect to ``q [n, D]`` and, in symmetric directions, ``H [n, D, D]``.

    ``H`` is a symmetric state (a sum of ``k k^T``), so only the symmetric part of its gradient reaches the keys;
    the antisymmetric part would measure how a solver treats a non-symmetric ``A``, which CG, built for
    symmetric systems, does not solve.
    """
    H, q = H.detach().requires_grad_(True), q.detach().requires_grad_(True)
    with torch.enable_grad():
        dq, dH = torch.autograd.grad((solve(H, q) * c).sum(), (q, H))
    return dq, (dH + dH.mT) / 2


def measure_group(H64: torch.Tensor, q64: torch.Tensor, c64: torch.Tensor, ridge: float, iters: int,
                  dtype: torch.dtype) -> dict:
    """Every metric of the study on one group of systems.

    Args:
        H64: normalised Gram states ``[n, D, D]``, float64.
        q64: right-hand sides ``[n, D]``, float64.
        c64: gradient cotangents ``[n, D]``, float64.
        ridge: the ridge ratio.
        iters: products with ``A``.
        dtype: the precision the solvers and gradients run in.

    Returns:
        ``residual`` and ``error``: ``{solver: [iters + 1, n]}``, plus ``"lu"`` (``torch.linalg.solve``
        in ``dtype``, ``[1, n]``); ``{reference}_q`` and ``{reference}_H`` for each of
        ``GRADIENT_REFERENCES``: ``{method: [n]}`` relative gradient errors.
    """
    A64, _ = ridge_system(H64, ridge)  # [n, D, D]
    exact = torch.linalg.solve(A64, q64)  # [n, D]
    H, q, c = H64.to(dtype), q64.to(dtype), c64.to(dtype)
    runs = {name: torch.stack(xs) for name, xs in solver_iterates(H, q, ridge, iters).items()}  # [iters + 1, n, D]
    runs["lu"] = torch.linalg.solve(ridge_system(H, ridge)[0], q)[None]  # [1, n, D]
    measured = {"residual": {}, "error": {}} | {f"{ref}_{wrt}": {} for ref in GRADIENT_REFERENCES for wrt in "qH"}
    for name, X in runs.items():
        measured["residual"][name], measured["error"][name] = _relative_to(A64, q64, exact, X)
    exact_grads = _gradients(lambda H_, q_: token_exact_solve(H_, q_, ridge), H64, q64, c64)
    unrolled = {solve: _gradients(lambda H_, q_: solve(H_, q_, ridge, iters), H64, q64, c64)
                for solve in (unrolled_cg_solve, unrolled_chebyshev_solve)}
    methods = {"cg_implicit": (cg_implicit_solve, unrolled_cg_solve),
               "chebyshev_implicit": (token_solve, unrolled_chebyshev_solve),
               "chebyshev_unrolled": (unrolled_chebyshev_solve, unrolled_chebyshev_solve)}
    for name, (solve, iteration) in methods.items():
        grads = _gradients(lambda H_, q_: solve(H_, q_, ridge, iters), H, q, c)
        for ref, (dq64, dH64) in (("exact", exact_grads), ("iteration", unrolled[iteration])):
            measured[f"{ref}_q"][name] = (grads[0].double() - dq64).norm(dim=-1) / dq64.norm(dim=-1)
            measured[f"{ref}_H"][name] = ((grads[1].double() - dH64).flatten(1).norm(dim=-1)
                                          / dH64.flatten(1).norm(dim=-1))
    return measured


def _spread(values: torch.Tensor) -> dict:
    """Median, 10% and 90% quantiles and maximum over the last dim, as lists (or numbers for 1-d input)."""
    low, median, high = torch.quantile(values, torch.tensor([0.1, 0.5, 0.9], dtype=values.dtype), dim=-1)
    return {"median": median.tolist(), "p10": low.tolist(), "p90": high.tolist(), "max": values.amax(-1).tolist()}


def _stays_at_or_below(curve: list[float], other: list[float]) -> int | None:
    """The first ``n`` from which ``curve[n] <= other[n]`` holds up to the end, or None."""
    start = None
    for n in reversed(range(len(curve))):
        if curve[n] > other[n]:
            break
        start = n
    return start


def run_solver_study(plan: SolverStudyPlan, *, progress: bool = False) -> dict:
    """Measure the plan's systems.

    Args:
        plan: from ``plan_solver_study``.
        progress: show a tqdm progress bar (systems) on stderr.

    Returns:
        the report: ``machine``, ``settings``, ``residual`` and ``error`` (per solver and ``"lu"``,
        the median, p10, p90 and max over the systems of each iteration ``0..iters``),
        ``chebyshev_bound`` (per iteration), ``gradients`` (per method and reference of
        ``GRADIENT_REFERENCES``, the spreads of the ``"q"`` and ``"H"`` gradients' relative errors),
        ``summary`` and ``elapsed_s``.
    """
    start = time.perf_counter()
    dtype = DTYPES[plan.dtype]
    groups = []
    with tqdm(total=plan.systems, desc="solver study", unit="system", disable=not progress, leave=False) as bar:
        for H64, q64, c64 in sample_systems(plan):
            measured = measure_group(H64, q64, c64, plan.ridge, plan.iters, dtype)
            groups.append({kind: {name: values.cpu() for name, values in table.items()}
                           for kind, table in measured.items()})
            bar.update(q64.shape[0])
    every = {kind: {name: torch.cat([group[kind][name] for group in groups], dim=-1) for name in groups[0][kind]}
             for kind in groups[0]}
    residual = {name: _spread(values) for name, values in every["residual"].items()}
    error = {name: _spread(values) for name, values in every["error"].items()}
    gradients = {name: {ref: {wrt: _spread(every[f"{ref}_{wrt}"][name]) for wrt in "qH"} for ref in GRADIENT_REFERENCES}
                 for name in GRADIENT_METHODS}
    last = plan.iters
    medians = {name: residual[name]["median"] for name in SOLVERS}
    settings = {
        "batch_size": plan.batch_size, "seq_len": plan.seq_len, "heads": plan.heads, "head_dim": plan.head_dim,
        "ridge": plan.ridge, "kappa_bound": kappa_bound(plan.ridge), "iters": plan.iters, "stride": plan.stride,
        "positions": f"t = {plan.stride - 1}, {2 * plan.stride - 1}, ..., {plan.positions * plan.stride - 1} "
                     f"(0-based; every {plan.stride}-th key), {plan.positions} per sequence",
        "systems": plan.systems, "seed": plan.seed, "dtype": plan.dtype,
        "iteration": "n = products with A; x_0 = step * q for GD, Nesterov and Chebyshev, 0 for CG",
        "metrics": "||A x_n - q|| / ||q|| and ||x_n - x*|| / ||x*|| in float64, x* = float64 linalg.solve; "
                   "relative errors of the gradients of <x, c> (c random) after iters steps",
        "gradient_references": GRADIENT_REFERENCES,
    }
    summary = {
        "chebyshev_at_or_below_cg_from": _stays_at_or_below(medians["chebyshev"], medians["cg"]),
        "lowest_median_residual_at_last_iteration": min(medians, key=lambda name: medians[name][last]),
    }
    return {"kind": "solver", "machine": machine_info(plan.device), "settings": settings, "residual": residual,
            "error": error, "chebyshev_bound": [chebyshev_bound(plan.ridge, n) for n in range(last + 1)],
            "gradients": gradients, "summary": summary, "elapsed_s": time.perf_counter() - start}


def _cell(spread: dict, n: int | None = None) -> str:
    pick = (lambda key: spread[key]) if n is None else (lambda key: spread[key][n])
    return f"{pick('median'):.1e} [{pick('p10'):.1e}, {pick('p90'):.1e}]"


def format_solver_report(report: dict) -> str:
    """The report as tables (median [p10, p90] over the systems), with the setup in header lines."""
    settings = report["settings"]
    last = settings["iters"]
    columns = [n for n in REPORT_ITERS if n < last] + [last]
    lines = [
        machine_line("Gated KalmaNet solver study", report["machine"]),
        f"{settings['systems']} systems: B={settings['batch_size']} x {settings['heads']} heads x positions "
        f"{settings['positions']}; T={settings['seq_len']}, D={settings['head_dim']}, ridge {settings['ridge']} "
        f"(kappa <= {settings['kappa_bound']:.4g}), solvers in {settings['dtype']}, seed {settings['seed']}",
        f"iteration {settings['iteration']}",
    ]
    for kind, title in (("residual", "relative residual ||A x_n - q|| / ||q||"),
                        ("error", "relative error ||x_n - x*|| / ||x*||")):
        lines += ["", f"{title}: median [p10, p90] over the systems",
                  f"{'solver':22s}" + "".join(f" {f'n={n}':>27s}" for n in columns)]
        for name, label in SOLVERS.items():
            lines.append(f"{label:22s}" + "".join(f" {_cell(report[kind][name], n):>27s}" for n in columns))
        lines.append(f"{'Chebyshev bound':22s}" + "".join(f" {report['chebyshev_bound'][n]:>27.1e}" for n in columns))
        lines.append(f"{'linalg.solve, ' + settings['dtype']:22s} {_cell(report[kind]['lu'], 0):>27s}")
    for ref, against in GRADIENT_REFERENCES.items():
        lines += ["", f"gradient relative error after {last} iterations in {settings['dtype']}, against {against}: "
                  "median [p10, p90], max", f"{'method':38s} {'d/dq':>38s} {'d/dH':>38s}"]
        for name, label in GRADIENT_METHODS.items():
            cells = [f"{_cell(spread)}, {spread['max']:.1e}" for spread in report["gradients"][name][ref].values()]
            lines.append(f"{label:38s} {cells[0]:>38s} {cells[1]:>38s}")
    summary = report["summary"]
    start = summary["chebyshev_at_or_below_cg_from"]
    lines += ["", ("Chebyshev's median residual is above CG's at the last iteration" if start is None else
                   f"Chebyshev's median residual is at or below CG's from n = {start} on")
              + f"; lowest at n = {last}: {SOLVERS[summary['lowest_median_residual_at_last_iteration']]}"]
    return "\n".join(lines)


def _title(report: dict) -> str:
    settings, machine = report["settings"], report["machine"]
    return (f"B={settings['batch_size']}, T={settings['seq_len']}, {settings['heads']} heads, "
            f"D={settings['head_dim']}, ridge {settings['ridge']}, {settings['systems']} systems (stride {settings['stride']}), "
            f"{settings['dtype']}, {machine['gpu'] or machine['cpu']}")


def plot_residuals(report: dict, path: str | Path) -> Path:
    """Draw the relative residual and error of every solver against the iteration (median, p10-p90 band, log y),
    with the Chebyshev bound and the LU solve in the solvers' dtype.

    Args:
        report: from ``run_solver_study``.
        path: the PNG file to write; its folder is created.

    Returns:
        the path.
    """
    figure = Figure(figsize=(PANEL_SIZE[0] * 2, PANEL_SIZE[1] * 1.2), layout="constrained")
    figure.suptitle(f"GKA solver study: {_title(report)}", fontsize="medium")
    iterations = list(range(report["settings"]["iters"] + 1))
    for ax, kind, label in zip(figure.subplots(1, 2), ("residual", "error"),
                               ("||A x_n - q|| / ||q||", "||x_n - x*|| / ||x*||")):
        for name, solver in SOLVERS.items():
            spread = report[kind][name]
            line = ax.plot(iterations, spread["median"], label=solver)
            ax.fill_between(iterations, spread["p10"], spread["p90"], color=line[0].get_color(), alpha=0.2)
        ax.plot(iterations, report["chebyshev_bound"], color="black", linestyle="--", linewidth=1,
                label="Chebyshev bound")
        ax.axhline(report[kind]["lu"]["median"][0], color="gray", linestyle=":",
                   label=f"linalg.solve, {report['settings']['dtype']}")
        ax.set_yscale("log")
        ax.set_xlabel("iteration n (products with A)")
        ax.set_ylabel(label)
        ax.set_title(f"relative {kind}: median, p10-p90 band")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    return _save(figure, path)


def plot_gradients(report: dict, path: str | Path) -> Path:
    """Draw the gradient errors of each method as bars (median) with p10-p90 whiskers, log y, one panel per
    reference of ``GRADIENT_REFERENCES``.

    Args:
        report: from ``run_solver_study``.
        path: the PNG file to write; its folder is created.

    Returns:
        the path.
    """
    figure = Figure(figsize=(PANEL_SIZE[0] * 2, PANEL_SIZE[1] * 1.2), layout="constrained")
    figure.suptitle(f"GKA gradient relative error after {report['settings']['iters']} iterations: {_title(report)}",
                    fontsize="medium")
    width = 0.38
    titles = {"exact": "against the float64 exact solve", "iteration": "against its own iteration (float64 autograd)"}
    for ax, ref in zip(figure.subplots(1, 2, sharey=True), GRADIENT_REFERENCES):
        for offset, (wrt, label) in zip((-width / 2, width / 2), (("q", "d/dq"), ("H", "d/dH"))):
            spreads = [report["gradients"][name][ref][wrt] for name in GRADIENT_METHODS]
            medians = [spread["median"] for spread in spreads]
            whiskers = [[median - spread["p10"] for median, spread in zip(medians, spreads)],
                        [spread["p90"] - median for median, spread in zip(medians, spreads)]]
            ax.bar([index + offset for index in range(len(spreads))], medians, width, yerr=whiskers, capsize=4,
                   label=label)
        ax.set_xticks(range(len(GRADIENT_METHODS)), [name.replace(", ", ",\n") for name in GRADIENT_METHODS.values()],
                      fontsize="small")
        ax.set_yscale("log")
        ax.set_title(titles[ref])
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend()
    figure.axes[0].set_ylabel("relative error (median, p10-p90)")
    return _save(figure, path)


def plot_solver_study(report: dict, folder: str | Path) -> list[Path]:
    """Write ``solver_residuals.png`` and ``solver_gradients.png`` into ``folder``; returns their paths."""
    folder = Path(folder)
    return [plot_residuals(report, folder / FIGURES[0]), plot_gradients(report, folder / FIGURES[1])]


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    return path
