"""What the test files share, as plain functions (the fixtures are in conftest.py): the `--set`
overrides of a run small enough for a test, running llmtrain (in this process, as a subprocess,
under torchrun, through a launch script), reading what a run leaves in its directory, and the tiny
models the model tests build.

llmtrain is imported inside the functions: conftest.py imports this module, and one part of
llmtrain that does not import must not stop the tests of the others from being collected.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
FORK_RANKS = Path(__file__).with_name("fork_ranks.py")

# One BPE tokenizer + indexed corpus for the whole test session (built once, ~15 s); the
# subprocesses below inherit it with os.environ.
CACHE = Path(os.environ.get("LLMTRAIN_TEST_CACHE", ROOT / ".cache-test"))
os.environ.setdefault("LLMTRAIN_CACHE", str(CACHE))

# The multi-process runs compared with the single-process one train this many steps.
PARALLEL_STEPS = 5
# Weights after 5 AdamW steps: an element whose gradient is ~0 moves by up to lr * m/sqrt(v),
# which amplifies float summation-order noise; 1e-4 is lr/30 (a wrong gradient moves by ~lr).
ATOL = 1e-4


# ----------------------------------------------------------------------------------------------
# Overrides


def as_overrides(sets: dict) -> list[str]:
    """`key=value` overrides of a {key: value} dict, in its order."""
    return [f"{k}={v}" for k, v in sets.items()]


def set_args(overrides: Iterable[str]) -> list[str]:
    """The command-line form of `overrides`: `--set key=value` for each."""
    return [arg for o in overrides for arg in ("--set", o)]


def tiny_overrides(run_dir: Path, **extra) -> list[str]:
    """A model and run small enough for a test to train a few steps in seconds."""
    base = {"model.n_layers": 2, "model.d_model": 64, "model.n_heads": 4, "model.vocab_size": 1024,
            "model.max_seq_len": 64, "train.seq_len": 32, "train.global_batch_size": 8,
            "train.micro_batch_size": 4, "train.steps": 6, "train.eval_every": 0,
            "train.eval_steps": 2, "train.log_every": 1, "optim.warmup_steps": 2,
            "logging.run_dir": str(run_dir), "logging.tensorboard": False,
            "logging.progress": False, "checkpoint.every": 0}
    base.update(extra)
    return as_overrides(base)


def parallel_overrides(run_dir: Path, **extra) -> list[str]:
    """`tiny_overrides` for PARALLEL_STEPS steps: the runs ATOL is sized for."""
    return tiny_overrides(run_dir, **{"train.steps": PARALLEL_STEPS, **extra})


def run_dir_of(overrides: Iterable[str]) -> Path:
    """The logging.run_dir that `overrides` set."""
    return Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("logging.run_dir=")))


# ----------------------------------------------------------------------------------------------
# Running llmtrain


def cli(*args: str) -> int:
    """`llmtrain ARGS` in this process; its exit code."""
    from llmtrain.cli import main
    return main(list(args))


def cli_train(overrides: Iterable[str], *args: str) -> int:
    """`llmtrain train ARGS --set ...` in this process; its exit code."""
    return cli("train", *args, *set_args(overrides))


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a test subprocess: this one's (the corpus cache included), one intra-op
    thread per process (ranks sharing a few cores oversubscribe them otherwise), then `extra`."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def run_command(cmd: list[str], timeout: float = 300, check: bool = True,
                cwd: Path | None = None,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`cmd` to its end, output captured as text, in `env` (default: subprocess_env()). With
    `check` it must exit 0; the assertion shows the ends of its output."""
    r = subprocess.run(cmd, env=subprocess_env() if env is None else env, cwd=cwd,
                       capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def train_command(overrides: Iterable[str], *args: str, nproc: int = 1, torchrun: bool = False,
                  max_restarts: int = 0) -> list[str]:
    """`python -m llmtrain train ARGS --set ...` as one process, or as `nproc` ranks of one node:
    both forked from an interpreter that has imported llmtrain already by fork_ranks.py (the
    ranks see what torchrun would give them, and start in a fraction of the time), or, with
    `torchrun` (or `max_restarts`), under torchrun itself (--standalone, as launch/torchrun.sh
    runs it)."""
    train = ["-m", "llmtrain", "train", *args, *set_args(overrides)]
    if not torchrun and not max_restarts:
        return [sys.executable, str(FORK_RANKS), str(0 if nproc == 1 else nproc), *train[2:]]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(nproc), "--max-restarts", str(max_restarts), *train]


def run_train(overrides: Iterable[str], *args: str, nproc: int = 1, torchrun: bool = False,
              **kw) -> subprocess.CompletedProcess:
    """`train_command(overrides, *args, nproc=nproc, torchrun=torchrun)` run to its end; `kw` as
    for `run_command` (by default it must exit 0 within 300 s)."""
    return run_command(train_command(overrides, *args, nproc=nproc, torchrun=torchrun), **kw)


def launch_script(name: str, *args: str, timeout: float = 60, cwd: Path | None = None,
                  **env: str) -> subprocess.CompletedProcess:
    """`bash launch/NAME ARGS` with PYTHON this interpreter and `env` on top of subprocess_env();
    any exit code (the caller checks it)."""
    return run_command(["bash", str(LAUNCH / name), *args], timeout=timeout, check=False,
                       cwd=cwd, env=subprocess_env(**{"PYTHON": sys.executable, **env}))


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------
# What a run leaves in its directory


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON Lines file, one a line."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def read_metrics(run_dir: Path) -> list[dict]:
    """The per-step records of metrics.jsonl."""
    return read_jsonl(run_dir / "metrics.jsonl")


def read_evals(run_dir: Path) -> list[dict]:
    """The validation records of eval.jsonl."""
    return read_jsonl(run_dir / "eval.jsonl")


def read_metric(run_dir: Path, key: str) -> list:
    """One key of every metrics.jsonl record, step by step."""
    return [r[key] for r in read_metrics(run_dir)]


def read_losses(run_dir: Path) -> list[float]:
    return read_metric(run_dir, "loss")


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def logged_steps(run_dir: Path) -> int:
    """How many lines metrics.jsonl has now (0 before it exists): for watching a running job."""
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def cut_back(run_dir: Path, keep: int, last: int) -> None:
    """As if the run had been killed after the step-`keep` checkpoint: drop the step-`last`
    checkpoint and the metrics logged after step `keep`."""
    shutil.rmtree(run_dir / "checkpoints" / f"step_{last}")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()[:keep]
    (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))


def load_dcp(checkpoint: Path, out: Path) -> dict:
    """A DCP checkpoint directory (every rank's shards) as one state dict, through the torch
    file `out`."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(checkpoint, out)
    return torch.load(out, weights_only=True)


def final_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """The model weights of the run's step-`step` checkpoint, gathered from every rank."""
    checkpoint = run_dir / "checkpoints" / f"step_{step}"
    return load_dcp(checkpoint, run_dir / f"weights_{step}.pt")["model"]


def assert_weights_close(got: dict, expected: dict, atol: float = ATOL) -> None:
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-4, atol=atol,
                                   msg=lambda m, k=k: f"{k}: {m}")


# ----------------------------------------------------------------------------------------------
# Tiny models

# The model of the model-level tests: 4 heads, so GQA and MQA have something to group.
TINY_MODEL = {"n_layers": 2, "d_model": 32, "n_heads": 4, "vocab_size": 61, "max_seq_len": 24}


def tiny_model_config(**kw):
    """A ModelConfig of TINY_MODEL with `kw` on top."""
    from llmtrain.config import ModelConfig
    return ModelConfig(**{**TINY_MODEL, **kw})


def seeded_model(cfg, seed: int = 0) -> torch.nn.Module:
    """The model of ModelConfig `cfg` (decoder or encoder-decoder) initialised after
    torch.manual_seed(seed), so the same weights on every call; in eval mode."""
    from llmtrain.model import build_model
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def tokens(B: int, T: int, vocab: int = TINY_MODEL["vocab_size"], seed: int = 1) -> torch.Tensor:
    """[B, T] token ids below `vocab`, the same for the same seed."""
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def one_thread():
    """Torch on one intra-op thread inside the block: tiny models and small CPU training loops
    only wait on a second one (40x slower measured on a shared 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def seeded_moe(init_std: float, seed: int = 0, **model):
    """One MoE layer of ModelConfig(n_heads=1, **model) built after torch.manual_seed(seed),
    router and expert weights drawn with std `init_std`."""
    from llmtrain.config import ModelConfig
    from llmtrain.model.moe import MoE
    torch.manual_seed(seed)
    layer = MoE(ModelConfig(**{"n_heads": 1, **model}))
    layer.init_weights(init_std, init_std)
    return layer


def init_run(run: Path, world_size: int = 1, **overrides):
    """(config, model) of a run dir holding config.yaml and model-only checkpoint step_1 of a
    freshly initialised tiny model, its weights moved off their init (biases and norms too)."""
    from llmtrain.config import load_config, save_config
    from llmtrain.model import build_model
    from llmtrain.train import checkpoint as ckpt
    cfg = load_config(None, tiny_overrides(run, **overrides), world_size=world_size)
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    torch.manual_seed(0)
    ours = build_model(cfg.model).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt.save_model(ckpt.checkpoint_dir(cfg), 1, ours, cfg)
    return cfg, ours
