"""The ``amalgam`` command."""

from __future__ import annotations

import argparse
import logging
import sys

from .amalgamation import IMITATION_SCHEDULES, MECHANISMS
from .problems import PROBLEMS
from .teachers import POOLS, TEACHERS

EXAMPLES = """examples:
  amalgam amalgamate                                   quick choice amalgamation of the large pool on Train
  amalgam amalgamate --pool small --mechanism minmax --preset cpu --out minmax-small --max-minutes 60
  amalgam amalgamate --out minmax-small --pool small --mechanism minmax --preset cpu --resume
  amalgam amalgamate --pool "adam:lr=0.01+torch.optim.AdamW:lr=0.001" --mechanism mean
  amalgam list                                         bundled students, one per line
  amalgam push ./amalgam-student my-user/my-student    upload a student folder to the Hugging Face Hub
  amalgam run train.py --optim amalgam                 run a script with the integrations registered
"""


def _amalgamate(args: argparse.Namespace) -> int:
    from .engine import amalgamate, check_request

    try:
        check_request(args.pool, args.mechanism, args.preset, args.problem, args.imitation)
    except ValueError as err:
        raise SystemExit(f"amalgam amalgamate: {err}") from None
    out = amalgamate(pool=args.pool, mechanism=args.mechanism, preset=args.preset, problem=args.problem,
                     out=args.out, seed=args.seed, resume=args.resume, max_minutes=args.max_minutes,
                     imitation=args.imitation, evaluate=not args.no_eval, data_root=args.data_root,
                     threads=args.threads)
    if out is None:
        print(f"stopped at a checkpoint (--max-minutes {args.max_minutes}); continue with the same command "
              "plus --resume", file=sys.stderr)
        return 3
    print(out)
    return 0


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

    return run_script(args.script, args.script_args) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amalgam", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Optimizer Amalgamation (ICLR 2022) for PyTorch: amalgamate teacher optimizers into a "
                    "learned student optimizer, share it on the Hub, and use it in training code.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    a = sub.add_parser("amalgamate", help="meta-train a student from a pool of teacher optimizers",
                       description="Meta-train an RNNProp student from a pool of teachers and write it to OUT in "
                                   "Hub layout (config.json, model.safetensors, README.md model card). "
                                   "Checkpoints after every period in OUT/training/.")
    a.add_argument("--pool", default="large",
                   help=f"preset pool ({', '.join(POOLS)}) or teachers joined by '+', e.g. 'adam:lr=0.01+sgd' "
                        f"(teachers: {', '.join(TEACHERS)}, or a dotted torch.optim.Optimizer class)")
    a.add_argument("--mechanism", default="choice", help=f"one of {', '.join(MECHANISMS)} (default choice)")
    a.add_argument("--preset", default="quick", help="quick (~15 min on 2 CPU cores), cpu (~2 h), paper (full "
                                                     "recipe, for a GPU or a long run)")
    a.add_argument("--problem", default="train", help=f"training problem: {', '.join(PROBLEMS)}")
    a.add_argument("--out", default="amalgam-student", help="output folder (default ./amalgam-student)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--resume", action="store_true", help="continue from OUT/training's checkpoints")
    a.add_argument("--max-minutes", type=float, default=None,
                   help="stop cleanly at the last checkpoint that fits in this many minutes")
    a.add_argument("--imitation", default="il_more",
                   help=f"imitation-weight schedule: {', '.join(IMITATION_SCHEDULES)} ('none': α = 0 baseline)")
    a.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation of the model card")
    a.add_argument("--data-root", default=None, help="folder with torchvision MNIST/FashionMNIST files")
    a.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    a.set_defaults(func=_amalgamate)

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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
