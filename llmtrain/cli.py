"""`llmtrain` command line: train | scaling | plan (more subcommands register here as they land).

User errors (`ConfigError`) print one line `error: ...` on stderr and exit with code 2, no
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from llmtrain.config import ConfigError, load_config

# Subcommands living in their own packages: module exposing add_parser(subparsers), and the
# subcommands it adds. Several import torch (~4 s), so a run builds only its own subcommand's
# parser (build_parser); `llmtrain --help` or an unknown subcommand builds them all.
_PLUGINS = {"llmtrain.scaling.cli": ("scaling",), "llmtrain.planner.cli": ("plan",),
            "llmtrain.train.export": ("export", "import-hf"), "llmtrain.generate": ("generate",),
            "llmtrain.bench": ("bench",), "llmtrain.ablate": ("ablate",)}
_BUILT_IN = ("train", "preprocess")


def cmd_train(args: argparse.Namespace) -> int:
    from llmtrain.config.layout import DistEnv  # torch-free: a config error costs no torch import
    env = DistEnv.from_environ()
    if args.check is not None:  # the launch scripts validate before starting N processes
        env = DistEnv(rank=0, world_size=args.check)
    # No CONFIG: the dataclass defaults, which configs/tiny.yaml spells out (a test keeps them equal).
    sets = list(args.set or ())
    say = print if env.rank == 0 else (lambda *a: None)
    try:
        if args.gpus is not None and args.plan != "auto":
            raise ConfigError(f"--gpus={args.gpus} is only read with --plan auto; the world size "
                              f"is the launcher's (torchrun --nproc_per_node ...)")
        if args.plan == "auto":
            if args.gpus is None:
                raise ConfigError(f"--plan auto needs --gpus N, the GPUs of this job (the "
                                  f"launched world size, {env.world_size} here)")
            if args.gpus != env.world_size:
                raise ConfigError(f"--plan auto needs --gpus equal to the launched world size "
                                  f"{env.world_size}, got --gpus={args.gpus}")
            from llmtrain.planner.search import trainable_overrides
            chosen, est = trainable_overrides(args.config, sets, args.gpus)
            say(f"plan: {' '.join('--set ' + o for o in chosen)} (estimated for 80 GiB H100 "
                f"SXM GPUs: {est.step_time_s:.3g} s/step, {est.memory['total'] / 2**30:.1f} "
                f"GiB/GPU)")
            sets += chosen
        cfg = load_config(args.config, sets, world_size=env.world_size, log=say)
    except ConfigError as e:
        e.same_on_every_rank = True  # the same file, overrides and world size on every rank
        e.one_process = args.check is not None  # --check: no ranks, whatever RANK says
        raise
    if args.check is not None:
        from llmtrain.train.loop import check_run_dir
        try:
            check_run_dir(cfg, args.overwrite, world_size=args.check)  # rank 0 checks it first
        except ConfigError as e:
            e.one_process = True
            raise
        print(f"config ok for {args.check} process(es): run dir {cfg.logging.run_dir}")
        return 0
    from llmtrain.train.loop import train
    summary = train(cfg, overwrite=args.overwrite)
    if env.rank == 0 and summary.get("finished"):
        print(f"run {cfg.logging.run_dir} already finished: its checkpoint {summary['finished']} "
              f"is at step {summary['steps']}, train.steps={cfg.train.steps}; nothing to do "
              f"(raise train.steps to extend it)")
    elif summary.get("stopped"):
        if env.rank == 0:
            print(f"stopped by {summary['stopped']} at step {summary['steps']}; checkpoint "
                  f"written, run the same command to resume")
        # after Ctrl-C the shell's convention for an interrupted command (a script's `&&` chain
        # stops); SIGTERM (preemption) exits 0, which Slurm's requeue expects
        return 130 if summary["stopped"] == "SIGINT" else 0
    elif env.rank == 0:
        val = summary["final_val_loss"]
        print(f"done: {summary['steps']} steps, {summary['tokens']:,} tokens, final validation "
              f"loss {val:.4f}; run dir {cfg.logging.run_dir}")
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from llmtrain.data.preprocess import preprocess
    preprocess(args.input, args.output, args.tokenizer, text_field=args.text_field,
               workers=args.workers, append_eod=args.append_eod, progress=not args.quiet,
               skip_bad_lines=args.skip_bad_lines)
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; `command` (the subcommand about to run, if known) limits the plugins
    imported to the one that defines it (none for train and preprocess)."""
    known = {*_BUILT_IN, *(name for names in _PLUGINS.values() for name in names)}
    if command not in known:
        command = None  # help, or a typo: argparse lists every subcommand
    parser = argparse.ArgumentParser(
        prog="llmtrain", description="Pretrain language models from a YAML run config.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("train", help="train a model from a YAML config (default: the tiny CPU run)",
                       description="Train from CONFIG (default: configs/tiny.yaml, embedded). "
                                   "Works under torchrun / the deepspeed launcher / srun.")
    p.add_argument("config", nargs="?", help="run config YAML (default: the embedded tiny.yaml)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=100 (repeatable)")
    p.add_argument("--overwrite", action="store_true",
                   help="allow a run_dir that holds a run with different model/data settings")
    p.add_argument("--plan", choices=["auto"],
                   help="auto: train with the fastest layout of --gpus GPUs that `llmtrain plan` "
                        "finds (for H100 SXM GPUs) and this trainer runs; docs/planner.md")
    p.add_argument("--gpus", type=int, help="with --plan auto: the GPUs of this job")
    p.add_argument("--check", type=int, metavar="WORLD_SIZE",
                   help="only validate the config for WORLD_SIZE processes, and that its run_dir "
                        "holds no different run, then exit (0 if so, 2 with the error); "
                        "launch/torchrun.sh and launch/deepspeed.sh run this first")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("preprocess", help="tokenize a corpus into a megatron-core .bin/.idx dataset",
                       description="Read text/jsonl/parquet files (bad lines are one-line "
                                   "errors naming file and line), tokenize "
                                   "(training a byte-level BPE with train:VOCAB, or loading a "
                                   "tokenizer.json / HF tokenizer dir) and write PREFIX.bin, "
                                   "PREFIX.idx and PREFIX.tokenizer.json. Train on it with "
                                   "data.source=indexed data.paths=[PREFIX].")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH_OR_GLOB",
                   help="text (.txt: one document per file), .jsonl/.json or .parquet files")
    p.add_argument("--output", required=True, metavar="PREFIX", help="output prefix")
    p.add_argument("--tokenizer", required=True, metavar="train:VOCAB|PATH",
                   help="train:32000 trains a BPE; else a tokenizer.json or HF tokenizer directory")
    p.add_argument("--text-field", default="text", help="field of jsonl/parquet rows (default text)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                   help="end every document with the EOD token (default on)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip malformed jsonl lines, non-UTF-8 text and non-string text fields "
                        "with one counted warning at the end instead of stopping on the first")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_preprocess)
    for mod, names in _PLUGINS.items():
        if command is not None and command not in names:
            continue
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name and mod.startswith(e.name):
                continue  # that subcommand's module is not part of this build
            raise
        if not hasattr(module, "add_parser"):
            continue
        module.add_parser(sub)
    return parser


# How long a rank other than 0 waits, on an error every rank has, for rank 0 to print it.
RANK0_GRACE_S = 60.0


def _let_rank0_say_it(rank: int, e: Exception) -> None:
    """Wait for the launcher to stop us once rank 0 has printed the error and exited.

    A rank that exits first makes torchrun (or the deepspeed launcher) SIGTERM the others, rank 0
    too, possibly before it has printed: a user would then see only "exitcode 2" and no reason.
    So the other ranks stay, silent, for up to RANK0_GRACE_S (rank 0 meets the same error within
    moments), and say it themselves if nobody has stopped them by then."""
    _sleep(RANK0_GRACE_S)
    print(f"error: rank {rank}: {e}", file=sys.stderr)


_sleep = time.sleep  # (a test replaces this name, not time.sleep for the whole process)


def _report(e: Exception, code: int) -> int:
    """Print a ConfigError (exit 2) or RunError (exit 1) as one line. An error that is the same
    on every rank (the config, or a verdict rank 0 broadcast) is printed by rank 0 alone; an
    error found later (data or a checkpoint on one node) may be a rank's own, so each rank that
    meets it says it."""
    from llmtrain.config.layout import DistEnv
    rank = DistEnv.from_environ().rank  # RANK, or SLURM_PROCID under srun without torchrun
    if rank == 0 or getattr(e, "one_process", False):
        print(f"error: {e}", file=sys.stderr)
    elif not getattr(e, "same_on_every_rank", False):
        print(f"error: rank {rank}: {e}", file=sys.stderr)
    else:
        _let_rank0_say_it(rank, e)
    return code


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(argv)
    except KeyboardInterrupt:  # also while torch is still being imported (build_parser)
        print("interrupted", file=sys.stderr)
        return 130


def _run(argv: list[str] | None) -> int:
    argv = (sys.argv[1:] if argv is None else argv) or ["train"]
    parser = build_parser(argv[0])
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except ConfigError as e:
        return _report(e, 2)
    except RuntimeError as e:
        from llmtrain.train.rundir import RunError
        if not isinstance(e, RunError):
            raise
        return _report(e, 1)


if __name__ == "__main__":
    sys.exit(main())
