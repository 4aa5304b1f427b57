"""The two meta-gradient estimators side by side in one process (docs/method.md#pes): truncated back-propagation
(first-order, as the cpu and quick presets run it) and PES, meta loss alone (α = 0), RNNProp at its seed-0
initialisation on the Train CNN with the presets' one-truncation warm-up.

1. Cost: the seconds of one truncation with its meta-gradient, per inner step, in plain forward+backward passes
   of the optimizee at the same batch size (measured in between, so machine noise hits both); for PES per pair
   (its two particles) and per particle.
2. Variance at equal compute: ``--samples`` independent trajectories, each estimating the meta-gradient at its 1st
   and 3rd truncation of the fixed student; PES with as many pairs as cost what one truncated estimate costs. For
   each: the summed per-coordinate variance tr Σ, the squared norm of the mean gradient (debiased: minus tr Σ / R),
   their ratio (the relative variance of one estimate) and the cosine of each estimator's mean gradient with the
   first's. ``--estimators truncated,second-order`` compares the first-order truncated estimate with the
   second-order one, which at the 1st truncation is the exact gradient PES estimates (the warm-up does not use
   the student's weights).

    python benchmarks/estimator_variance.py --threads 1 --sigma 0.01
    python benchmarks/estimator_variance.py --threads 1 --estimators truncated,second-order
    python benchmarks/estimator_variance.py --threads 1 --estimators pes --sigma 0.001
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import replace

import torch

from amalgam_plugin.engine.estimator import EstimatorConfig, TruncatedEstimator
from amalgam_plugin.engine.pes import PESEstimator
from amalgam_plugin.problems import Problem, make_problem
from amalgam_plugin.students import RNNProp

TRUNCATIONS = (0, 2)  # the truncations (from 0) whose estimates are compared


def plain_pass(problem: Problem, params: list[torch.Tensor], batch) -> float:
    start = time.perf_counter()
    problem.loss(params, batch).backward()
    return time.perf_counter() - start


def gradient(student: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in student.parameters()])


def samples(estimator, student, seeds: range, warmup: int) -> tuple[dict[int, torch.Tensor], list[float]]:
    """Per truncation of TRUNCATIONS, the estimates of ``seeds``' trajectories [R, weights]; seconds per truncation."""
    out, seconds = {t: [] for t in TRUNCATIONS}, []
    for seed in seeds:
        traj = estimator.trajectory(torch.Generator().manual_seed(seed), warmup, with_teachers=False)
        for t in range(max(TRUNCATIONS) + 1):
            start = time.perf_counter()
            est = estimator.estimate(traj, 0.0)
            seconds.append(time.perf_counter() - start)
            if not est.finite:
                raise RuntimeError(f"trajectory {seed}: truncation {t} is not finite")
            if t in out:
                out[t].append(gradient(student))
    return {t: torch.stack(v).double() for t, v in out.items()}, seconds


def spread(g: torch.Tensor) -> tuple[float, float]:
    """tr Σ of one estimate, and ‖mean‖² debiased by tr Σ / R."""
    trace = float(g.var(0).sum())
    return trace, float(g.mean(0).square().sum()) - trace / len(g)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problem", default="train")
    parser.add_argument("--unroll", type=int, default=20, help="inner steps per truncation")
    parser.add_argument("--samples", type=int, default=16, help="independent trajectories per estimator")
    parser.add_argument("--sigma", type=float, default=EstimatorConfig().pes_sigma, help="PES: std of ε per weight")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--estimators", default="truncated,pes",
                        help="the variance part's estimators, of: truncated, second-order (truncated with the "
                             "second-order terms, exact at the 1st truncation), pes; cosines are to the first's mean")
    args = parser.parse_args()
    wanted = args.estimators.split(",")
    if not wanted or set(wanted) - {"truncated", "second-order", "pes"}:
        parser.error(f"--estimators takes truncated, second-order and pes, got {args.estimators!r}")
    torch.set_num_threads(args.threads)

    problem = make_problem(args.problem)
    params = [t.requires_grad_(True) for t in problem.init_params(torch.Generator().manual_seed(0))]
    batch = next(problem.train_batches(torch.Generator().manual_seed(0)))
    student = RNNProp()
    student.reset_parameters(torch.Generator().manual_seed(0))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load average {load:.1f} on "
          f"{os.cpu_count()} CPUs; problem {problem.name} ({sum(p.numel() for p in params):,} parameters, batch "
          f"{problem.batch_size}); RNNProp ({sum(p.numel() for p in student.parameters()):,} weights); "
          f"{args.unroll}-step truncations, warm-up {args.unroll} steps; α = 0; PES σ = {args.sigma}")

    first_order = EstimatorConfig(unroll_length=args.unroll, mechanism="minmax", second_order=False)
    pes_config = replace(first_order, gradient_estimator="pes", pes_sigma=args.sigma)
    truncated = TruncatedEstimator(student, problem, [], first_order)
    one_pair = PESEstimator(student, problem, [], pes_config)
    passes, costs = [], {"truncated": [], "pes": []}
    for seed in range(3):  # cost: one truncation of each, alternating, with plain passes in between
        for name, estimator in (("truncated", truncated), ("pes", one_pair)):
            traj = estimator.trajectory(torch.Generator().manual_seed(100 + seed), 0, with_teachers=False)
            passes.append(plain_pass(problem, params, batch))
            start = time.perf_counter()
            estimator.estimate(traj, 0.0)
            costs[name].append(time.perf_counter() - start)
    unit = statistics.median(passes)
    step = {name: statistics.median(v[1:]) / args.unroll / unit for name, v in costs.items()}
    print(f"\ncost of one inner step, in plain passes of {unit * 1000:.1f} ms (medians of 2 after one warm-up):")
    print(f"  truncated back-propagation, first-order: {step['truncated']:.2f}")
    print(f"  PES, one antithetic pair (2 particles, forward only): {step['pes']:.2f} "
          f"({step['pes'] / 2:.2f} per particle)")

    pairs = max(1, round(step["truncated"] / step["pes"]))
    pes = PESEstimator(student, problem, [], replace(pes_config, pes_pairs=pairs))
    seeds = range(args.samples)
    estimates, seconds = {}, {}
    second_order = TruncatedEstimator(student, problem, [], replace(first_order, second_order=True))
    named = {"truncated": ("truncated", truncated), "second-order": ("second-order", second_order),
             "pes": (f"pes ({pairs} pair{'s' if pairs > 1 else ''})", pes)}
    for name, estimator in (named[w] for w in wanted):
        estimates[name], spent = samples(estimator, student, seeds, args.unroll)
        seconds[name] = statistics.median(spent)
    print(f"\nvariance at equal compute: {args.samples} trajectories each; PES with {pairs} pair(s) per estimate")
    print(f"{'estimator':18} {'s/truncation':>12} {'truncation':>10} {'tr Σ':>11} {'‖mean‖²':>11} "
          f"{'tr Σ / ‖mean‖²':>15} {'cos(means)':>10}")
    for t in TRUNCATIONS:
        first = next(iter(estimates.values()))[t].mean(0)
        for name, g in estimates.items():
            cosine = float(torch.nn.functional.cosine_similarity(g[t].mean(0), first, dim=0))
            trace, norm = spread(g[t])
            ratio = f"{trace / norm:15.1f}" if norm > 0 else f"{'(mean < noise)':>15}"
            print(f"{name:18} {seconds[name]:12.2f} {t + 1:10d} {trace:11.3e} {norm:11.3e} {ratio} {cosine:10.3f}",
                  flush=True)


if __name__ == "__main__":
    main()
