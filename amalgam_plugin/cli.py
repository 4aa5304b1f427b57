"""The ``amalgam`` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from .amalgamation import IMITATION_SCHEDULES, MECHANISMS
from .heldout import cli as heldout_cli
from .problems import PROBLEMS, evaluable_problem
from .registry import Registry
from .students import STUDENTS
from .teachers import POOLS, TEACHERS

EXAMPLES = """examples:
  amalgam amalgamate                                   quick choice amalgamation of the large pool on Train
  amalgam amalgamate --pool small --mechanism minmax --preset cpu --out minmax-small --max-minutes 60
  amalgam amalgamate --out minmax-small --pool small --mechanism minmax --preset cpu --resume
  amalgam amalgamate --pool "adam:lr=0.01+torch.optim.AdamW:lr=0.001" --mechanism mean
  amalgam amalgamate --pool small --mechanism minmax --perturb gaussian-adaptive --out gaussian-small
  amalgam evaluate amalgam-choice-large-quick torch.optim.AdamW:lr=1e-3 --problems train mlp --seeds 5
  amalgam evaluate --replicates 'runs/minmax-*' --replicates 'runs/gaussian-*' --problems mlp --no-baselines
  amalgam list                                         bundled students, one per line
  amalgam push ./amalgam-student my-user/my-student    upload a student folder to the Hugging Face Hub
  amalgam run train.py --optim amalgam                 run a script with the integrations registered
"""


def amalgamate_arguments(args: argparse.Namespace) -> dict:
    """``amalgam amalgamate``'s flags as the arguments of :func:`~amalgam_plugin.engine.amalgamate`."""
    from .engine import Perturbation

    return dict(pool=args.pool, mechanism=args.mechanism, preset=args.preset, problem=args.problem, out=args.out,
                seed=args.seed, resume=args.resume, max_minutes=args.max_minutes, imitation=args.imitation,
                evaluate=not args.no_eval, data_root=args.data_root, threads=args.threads, student=args.student,
                full_eval=args.full_eval, workers=args.workers, overwrite=args.overwrite,
                trajectories_per_step=args.trajectories_per_step, device=args.device, select=args.select,
                settings=dict(args.set) or None, student_config=dict(args.student_config) or None,
                perturbation=Perturbation(args.perturb, args.perturb_magnitude, args.perturb_steps))


def _amalgamate(args: argparse.Namespace) -> int:
    from .engine import amalgamate

    # amalgamate checks every argument before any work; main() reports a ValueError in one line
    out = amalgamate(**amalgamate_arguments(args))
    if out is None:
        print(f"stopped at a checkpoint (--max-minutes {args.max_minutes}); continue with the same command "
              "plus --resume", file=sys.stderr)
        return 3
    if int(os.environ.get("RANK", "0")) == 0:  # under a launcher, rank 0 wrote the student and reports it
        print(summary_text(json.loads((Path(out) / "training" / "summary.json").read_text())))
    return 0


def _setting(text: str) -> tuple[str, object]:
    """``--set`` or ``--student-config`` ``NAME=VALUE``: the name and the JSON value."""
    name, sep, value = text.partition("=")
    try:
        if not (sep and name):
            raise ValueError
        return name, json.loads(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with VALUE in JSON (--set 'depths=[1,2,5]', "
                                         f"--student-config orthogonalize=true), got {text!r}") from None


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


TIE_HALF_WIDTH = 0.1
"""An interval holding 0 is a tie only when it is narrower than ±0.1 in log loss (about 10% in loss, the size of
the differences between the paper's optimizers); a wider one cannot tell a tie from a real gap."""


def verdict(mean: float, low: float, high: float) -> str:
    """How the student compares with the best baseline, from baseline − student and its 95% interval."""
    if low > 0:
        return "better than the best baseline"
    if high < 0:
        return "worse than the best baseline"
    if (high - low) / 2 > TIE_HALF_WIDTH:
        side = "ahead of" if mean > 0 else "behind"
        return (f"too few seeds to tell: the student is {abs(mean):.3f} {side} the best baseline on average, "
                f"and the interval is {high - low:.3f} wide")
    return "level with the best baseline"


def summary_text(summary: dict) -> str:
    """What ``amalgam amalgamate`` prints at the end: where the student is, how it did, how long it took."""
    lines = [f"student: {summary['folder']}/ (model card README.md, config.json, model.safetensors)"]
    if "difference" in summary:
        d = summary["difference"]
        lines.append(
            f"held-out, {summary['seeds']} paired seeds, best log loss (lower is better): student "
            f"{summary['student_best_log_heldout']:.3f}, best baseline {summary['best_baseline']} "
            f"{summary['best_baseline_log_heldout']:.3f}; baseline - student = {d['mean']:+.3f} "
            f"[{d['low']:+.3f}, {d['high']:+.3f}] (95% CI): {verdict(d['mean'], d['low'], d['high'])}")
    total = summary["meta_training_seconds"] + summary["evaluation_seconds"]
    evaluation = (f"evaluation {_minutes(summary['evaluation_seconds'])}" if "difference" in summary
                  else "not evaluated: --no-eval")
    lines.append(f"time: {_minutes(total)} (meta-training {_minutes(summary['meta_training_seconds'])}, "
                 f"{evaluation}; {summary['threads']} torch thread(s))")
    return "\n".join(lines)


MAX_SEEDS = 100  # ten times the protocol's 10 paired seeds; each seed adds one run per optimizer and problem


def _evaluate(args: argparse.Namespace) -> int:
    from . import suite

    if args.suite == "heldout":
        return heldout_cli.evaluate(args)
    heldout_cli.refuse_its_options(args)
    if not args.optimizers and not args.replicates:
        raise ValueError("nothing to evaluate: name at least one student or optimizer, or --replicates GLOB")
    for name in args.problems:
        evaluable_problem(name)
    if not 1 <= args.seeds <= MAX_SEEDS or args.steps < 1 or args.eval_every < 1:
        raise ValueError(f"--seeds must be in [1, {MAX_SEEDS}], --steps and --eval-every positive")
    cpus = os.cpu_count() or 1
    if not 1 <= args.workers <= cpus:
        raise ValueError(f"--workers must be between 1 and this machine's {cpus} CPUs, got {args.workers}")
    out = Path(args.out)
    if args.card:
        _check_card_folder(Path(args.card))
    suite.check_output_folder(out, args.overwrite)
    candidates = [suite.candidate(spec) for spec in args.optimizers]
    for pattern in args.replicates:
        candidates += suite.replicate_group(pattern)
    forms = tuple(f.strip() for f in args.forms.split(","))
    result = suite.run_suite(candidates, args.problems, list(range(args.seeds)), out, args.steps, args.eval_every,
                             None if args.no_baselines else args.pool, forms, workers=args.workers,
                             data_root=args.data_root, overwrite=args.overwrite)
    print(suite.markdown(result))
    print(f"written: {out / 'results.md'}, {out / 'results.json'}, {out / 'plots'}/")
    if args.card:
        print(f"model card updated: {suite.embed_in_card(result, out, Path(args.card))}")
    return 0


def _check_card_folder(folder: Path) -> None:
    """``--card`` names a student's folder: a model card beside a config.json and model.safetensors that load."""
    from .hub import load_folder

    if not (folder / "README.md").is_file():
        raise ValueError(f"--card {str(folder)!r} holds no model card (README.md)")
    try:
        load_folder(folder)
    except (ValueError, OSError) as err:
        raise ValueError(f"--card {str(folder)!r} is not a student folder: {err}") from err


def _list(args: argparse.Namespace) -> int:
    from .hub import list_bundled

    for name, description in list_bundled():
        print(f"{name}\t{description}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from .hub import push_folder

    print(push_folder(args.folder, args.repo_id, private=args.private, revision=args.revision))
    return 0


def _run(args: argparse.Namespace) -> int:
    from .integrations import run_script

    if not Path(args.script).is_file():
        raise SystemExit(f"amalgam run: no such script: {args.script!r}")
    return run_script(args.script, args.script_args) or 0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump (``--help`` shows the usage)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _choice(parser: argparse.ArgumentParser, flag: str, registry: Registry, default: str | None, what: str = "",
            default_text: str = "") -> None:
    """An option whose choices, help and error ("unknown X; valid Xs: ...") come from a registry."""

    def known(name: str) -> str:
        try:
            registry.lookup(name)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return name

    parser.add_argument(flag, default=default, type=known, metavar=flag.lstrip("-").upper(),
                        help=f"{what or registry.kind}: {registry.help()} (default {default_text or default})")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="amalgam", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Optimizer Amalgamation (ICLR 2022) for PyTorch: amalgamate teacher optimizers into a "
                    "learned student optimizer, share it on the Hub, and use it in training code.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level; show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    a = sub.add_parser("amalgamate", help="meta-train a student from a pool of teacher optimizers",
                       description="Meta-train a student from a pool of teachers and write it to OUT in Hub layout "
                                   "(config.json, model.safetensors, README.md model card). Checkpoints after "
                                   "every period in OUT/training/.")
    a.add_argument("--pool", default="large",
                   help=f"a preset pool, {POOLS.help()}; or teachers joined by '+', each name:key=value,..., "
                        f"e.g. 'adam:lr=0.01+sgd' (teachers: {TEACHERS.valid()}, or a dotted "
                        "torch.optim.Optimizer class). Default: large")
    _choice(a, "--mechanism", MECHANISMS, "choice")
    from .engine import DEFAULT_THREADS, PERTURBATIONS, PRESETS, SELECT_FLAGS  # the engine loads only when needed

    _choice(a, "--preset", PRESETS, "quick")
    _choice(a, "--problem", PROBLEMS, "train", "training problem")
    _choice(a, "--student", Registry("student type", {n: (e, STUDENTS.descriptions[n])
                                                      for n, e in STUDENTS.items() if e.trainable}), None,
            default_text="the preset's: normalized for quick, rnnprop for the others")
    _choice(a, "--imitation", IMITATION_SCHEDULES, "il_more", "imitation-weight schedule")
    _choice(a, "--perturb", PERTURBATIONS, "none", "perturbation of the student's weights while it is meta-trained")
    a.add_argument("--perturb-magnitude", type=float, default=None, metavar="EPS",
                   help="the perturbation's magnitude ε (default: the kind's own, listed above)")
    a.add_argument("--perturb-steps", type=int, default=1,
                   help="ascent steps of an adversarial perturbation before each meta-step (default 1)")
    a.add_argument("--out", default="amalgam-student", help="output folder (default ./amalgam-student)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--resume", action="store_true",
                   help="continue from OUT/training's checkpoints (a non-empty OUT must hold an amalgamate run)")
    a.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty OUT that holds no earlier run (refused otherwise)")
    a.add_argument("--max-minutes", type=float, default=None,
                   help="stop cleanly at the last checkpoint that fits in this many minutes")
    a.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation of the model card")
    a.add_argument("--full-eval", action="store_true",
                   help="the card's full evaluation: 10 paired seeds, both forms of every teacher, nothing reused")
    a.add_argument("--workers", type=int, default=None,
                   help="evaluation worker processes, one torch thread each, at most one per CPU core (default: "
                        "one per CPU core)")
    a.add_argument("--data-root", default=None, help="folder with torchvision MNIST/FashionMNIST files")
    a.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                   help=f"torch threads of meta-training (default {DEFAULT_THREADS})")
    a.add_argument("--trajectories-per-step", type=int, default=None, metavar="N",
                   help="trajectories whose meta-gradients are averaged into one meta-update (default: the "
                        "preset's 1, or the number of processes under torchrun / accelerate launch, which share "
                        "them out; the student does not depend on how many processes ran it)")
    a.add_argument("--select", choices=SELECT_FLAGS, default=None,
                   help="how the student's final checkpoint is chosen (default: the preset's): best (the last "
                        "stage's best validation), last (the final period), horizon (of the stages' best "
                        "checkpoints, the one that trains best over whole runs on validation digits; "
                        "docs/method.md#horizon-selection), average (the mean of the last stage's weights; "
                        "docs/method.md#weight-averaging) or horizon-start (horizon over the student before "
                        "meta-training and the stages' checkpoints: quick's)")
    a.add_argument("--set", type=_setting, action="append", default=[], metavar="NAME=VALUE",
                   help="change one setting of the student's recipe, VALUE in JSON: --set 'depths=[1,2,5]' "
                        "(the settings: docs/method.md#presets, or a card's recipe); repeatable")
    a.add_argument("--student-config", type=_setting, action="append", default=[], metavar="NAME=VALUE",
                   help="change one field of the student's config.json before it is meta-trained, VALUE in JSON: "
                        "--student-config orthogonalize=true (the normalized student's harness, "
                        "docs/method.md#normalized); repeatable")
    a.add_argument("--device", default="cpu",
                   help="where meta-training runs: cpu (default) or cuda (under a launcher, each process its own "
                        "GPU); the card's evaluation runs on the CPU")
    a.set_defaults(func=_amalgamate)

    e = sub.add_parser("evaluate", help="evaluate students and optimizers on a suite of problems",
                       description="Each problem with each optimizer on paired seeds, beside the pool's teachers "
                                   "(both forms), the oracle and torch Adam tuned on the training digits. Writes "
                                   "OUT/results.md, OUT/results.json and OUT/plots/; resumes from OUT/cache.json.")
    e.add_argument("optimizers", nargs="*", metavar="STUDENT_OR_OPTIMIZER",
                   help="a student (bundled name, folder or Hub repo id) or a torch optimizer by dotted name with "
                        "arguments, e.g. torch.optim.AdamW:lr=1e-3; the first is the reference of the differences")
    e.add_argument("--replicates", action="append", default=[], metavar="GLOB",
                   help="student folders of one configuration (e.g. 'runs/minmax-*'): each is evaluated, and the "
                        "group gets its meta-stability; repeatable")
    e.add_argument("--problems", nargs="+", default=["train"], metavar="PROBLEM",
                   help=f"problems: {PROBLEMS.help()} (default train)")
    e.add_argument("--seeds", type=int, default=10, help=f"paired seeds 0..N-1, N at most {MAX_SEEDS} (default 10)")
    e.add_argument("--steps", type=int, default=1000, help="training steps per run (default 1000)")
    e.add_argument("--eval-every", type=int, default=25, help="held-out loss every N steps (default 25)")
    e.add_argument("--pool", default="large", help="the baselines' teacher pool (default large)")
    e.add_argument("--forms", default="paper,torch", help="teacher forms among the baselines (default paper,torch)")
    e.add_argument("--no-baselines", action="store_true", help="only the optimizers named (no pool, oracle, Adam)")
    e.add_argument("--out", default="amalgam-evaluation", help="output folder (default ./amalgam-evaluation)")
    e.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty OUT that holds no earlier run (its cache.json, results.md ... are "
                        "replaced)")
    e.add_argument("--card", default=None, metavar="FOLDER",
                   help="also put the tables and plots into the model card (README.md) of the student in FOLDER "
                        "(its section is replaced on a rerun; the plots are copied beside it)")
    e.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="runs at a time, each of one torch thread (1: in this process; default and most: one per CPU "
                        "core)")
    e.add_argument("--data-root", default=None, help="folder with torchvision MNIST/FashionMNIST files")
    heldout_cli.add_arguments(e)
    e.set_defaults(func=_evaluate)

    lst = sub.add_parser("list", help="print the bundled students, one 'NAME<TAB>description' per line")
    lst.set_defaults(func=_list)

    p = sub.add_parser("push", help="upload a student folder to the Hugging Face Hub")
    p.add_argument("folder")
    p.add_argument("repo_id")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", default=None, help="branch to push to")
    p.set_defaults(func=_push)

    r = sub.add_parser("run", help="run a Python script with the transformers/timm integrations registered "
                                   "(so --optim amalgam works in unmodified scripts)")
    r.add_argument("script")
    r.add_argument("script_args", nargs=argparse.REMAINDER)
    r.set_defaults(func=_run)
    return parser


# what survives Ctrl+C: meta-training's checkpoints and the evaluations' cache.json
RESUME_ADVICE = {"amalgamate": "; continue with the same command plus --resume",
                 "evaluate": "; rerun the same command to resume"}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "run":  # the user's script: its errors keep their tracebacks
        return args.func(args)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl+C must not turn the line into a traceback
        print(f"amalgam {args.command}: interrupted{RESUME_ADVICE.get(args.command, '')}", file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:  # bad input (a folder, a student, a name): one line, no traceback
        if args.verbose:
            raise
        print(f"amalgam {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
