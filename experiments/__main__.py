"""Command line: run a named experiment configuration.

    python -m experiments NAME [--seeds N] [--max-steps S] [--subset M] [--out DIR]
                               [--methods a,b,c] [--data-dir D] [--list]
                               [--eval-every E] [--feedback F] [--model M] [--lr LR]
                               [--batch-size K] [--loop L] [--no-download] [--no-progress]
                               [--budget-seconds S] [--lr-schedule linear|cosine]
                               [--calibration-rounds R] [--diagnostic-examples M]

``python -m experiments --list`` lists the configurations and methods. Results go to
``results/NAME/`` (or ``--out``): ``metrics.jsonl``, ``summary.json``, ``table.md`` and the
plots ``loss_vs_time.png``, ``loss_vs_steps.png``, ``error_vs_steps.png``.

``--budget-seconds S`` runs the compute-matched protocol (``experiments.compute_matched``):
every method gets S seconds of training, its learning rate decayed to zero at the number of
steps its calibrated speed fits into S.

Exit codes: 0 success, 2 bad arguments or missing data files (the loader's message says
which files to put where).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from adambs_jax.feedback import FEEDBACK_KINDS
from experiments.configs import CONFIGS, get_config
from experiments.methods import METHODS, method_available


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments",
        description="Run a named experiment (dataset x model x methods x seeds) and write "
        "metrics, a summary, a table and plots under results/NAME/.",
    )
    parser.add_argument("name", nargs="?", help="configuration name (see --list)")
    parser.add_argument("--list", action="store_true", help="list configurations and methods")
    parser.add_argument("--seeds", type=int, help="number of seeds (seeds 0..N-1)")
    parser.add_argument(
        "--max-steps", type=int, help="at most this many training steps per run (quick look)"
    )
    parser.add_argument("--subset", type=int, help="train on the first M training examples")
    parser.add_argument("--out", help="output folder (default results/NAME)")
    parser.add_argument("--methods", help="comma-separated method names (default: the config's)")
    parser.add_argument(
        "--data-dir",
        help="where the dataset files are (default $ADAMBS_DATA_DIR or ~/.cache/adambs_jax)",
    )
    parser.add_argument("--eval-every", type=int, help="evaluate every this many steps")
    parser.add_argument(
        "--feedback",
        choices=FEEDBACK_KINDS,
        help="what the bandit samplers learn from (default: the config's)",
    )
    parser.add_argument("--model", help="override the model (e.g. pixel-lstm)")
    parser.add_argument("--lr", type=float, help="override the learning rate")
    parser.add_argument("--batch-size", type=int, help="override the batch size K")
    parser.add_argument(
        "--loop",
        choices=("auto", "scan", "python"),
        help="how timed chunks run (default auto: see experiments/runner.py)",
    )
    parser.add_argument(
        "--no-download",
        action="store_true",
        help="never download missing dataset files (fail with the list of files)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--budget-seconds",
        type=float,
        help="compute-matched protocol: S seconds of training per method and "
        "run, learning rate decayed to 0 at the steps that fit",
    )
    parser.add_argument(
        "--lr-schedule",
        choices=("linear", "cosine"),
        help="the compute-matched decay (default linear)",
    )
    parser.add_argument(
        "--calibration-rounds",
        type=int,
        help="one-chunk runs per method that measure its steps/s (default 10)",
    )
    parser.add_argument(
        "--diagnostic-examples",
        type=int,
        help="examples whose gradient norms the sampler diagnostics use (default 1024; 0: none)",
    )
    return parser


def list_text() -> str:
    lines = ["Configurations:"]
    for name, c in CONFIGS.items():
        steps = f"{c.num_steps} steps" if c.num_steps is not None else f"{c.num_epochs:g} epochs"
        data = " [needs data files]" if c.needs_files else ""
        lines.append(
            f"  {name:18s} {c.dataset} / {c.model}, K={c.batch_size}, lr={c.learning_rate:g}, "
            f"{steps}, {c.num_seeds} seeds, methods {','.join(c.methods)}{data}"
        )
    lines += ["", "Methods:"]
    for name, m in METHODS.items():
        missing = (
            "" if method_available(name) else "  [unavailable: needs ab." + str(m.requires) + "]"
        )
        lines.append(f"  {name:14s} {m.description}{missing}")
    return "\n".join(lines)


def apply_overrides(config, args):
    changes = {}
    if args.seeds is not None:
        if args.seeds < 1:
            raise ValueError("--seeds must be >= 1")
        changes["num_seeds"] = args.seeds
    if args.subset is not None:
        if args.subset < 1:
            raise ValueError("--subset must be >= 1")
        changes["subset"] = args.subset
    if args.methods:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
        changes["methods"] = methods
    for attr, key in (
        ("eval_every", "eval_every"),
        ("feedback", "feedback"),
        ("model", "model"),
        ("lr", "learning_rate"),
        ("batch_size", "batch_size"),
        ("loop", "loop"),
        ("budget_seconds", "budget_seconds"),
        ("lr_schedule", "lr_schedule"),
        ("calibration_rounds", "calibration_rounds"),
        ("diagnostic_examples", "diagnostic_examples"),
    ):
        value = getattr(args, attr)
        if value is not None:
            changes[key] = value
    if args.no_download and config.needs_files:
        changes["dataset_options"] = {**dict(config.dataset_options), "download": False}
    config = config.replace(**changes)
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise ValueError("--max-steps must be >= 1")
        config = config.replace(max_steps=args.max_steps)
    return config


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.list:
        print(list_text())
        return 0
    if not args.name:
        parser.print_usage(sys.stderr)
        print("error: give a configuration name, or --list", file=sys.stderr)
        return 2
    try:
        config = apply_overrides(get_config(args.name), args)
    except (KeyError, ValueError) as err:
        print(f"error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    out_dir = Path(args.out) if args.out else Path("results") / config.name

    from experiments.data import CorruptFileError
    from experiments.runner import run_experiment

    started = time.perf_counter()
    try:
        summary = run_experiment(
            config, out_dir, data_dir=args.data_dir, progress=not args.no_progress
        )
    except (FileNotFoundError, CorruptFileError) as err:  # the loader says what to do
        print(f"error: {config.name}: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        if "adambs_jax does not have" in str(err):
            print(f"error: {err}", file=sys.stderr)
            return 2
        raise
    wall = time.perf_counter() - started
    print()
    print((out_dir / "table.md").read_text())
    print(f"Done in {wall:.1f} s. Results in {out_dir}/:")
    for name in ["table.md", "summary.json", "metrics.jsonl", *summary["files"]["plots"]]:
        print(f"  {out_dir / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
