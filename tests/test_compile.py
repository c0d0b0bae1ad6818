"""`parallel.compile: true` (parallel/compile.py): per-block torch.compile trains like the eager
model, per-step losses within 1e-5 relative (fp32) of the single-process eager run, on one process
and at dp2 ZeRO-3, dp2 ZeRO-1 with selective activation checkpointing, pp2 and tp2 with sequence
parallelism (the first block's input is then an AsyncCollectiveTensor, which the compiled block
must hand its gradient: parallel/compile.py). Each run prints its compile time once, and no
training step after the second compiles a graph (the recompilation guard: CompileClock's
warning, read from the run's output).

Inductor compiles C++ here (tens of seconds per process on a cold cache): one eager reference,
five compiled runs, the smallest model the other layout tests use."""

from __future__ import annotations

import pytest

from helpers import cli_train, parallel_overrides, read_losses, run_train

# untied, so that the pipeline layout can split it (tied embeddings are refused with pp > 1)
MODEL = {"model.tie_embeddings": False}
COMPILE = {**MODEL, "parallel.compile": True}
RECOMPILED = "warning: torch.compile compiled"


@pytest.fixture(scope="module")
def eager(tmp_path_factory) -> list[float]:
    """The losses of the single-process eager run every compiled run is compared with."""
    run = tmp_path_factory.mktemp("eager") / "run"
    assert cli_train(parallel_overrides(run, **MODEL)) == 0
    return read_losses(run)


def check_compiled_run(run, out: str, eager: list[float]) -> None:
    assert read_losses(run) == pytest.approx(eager, rel=1e-5)
    assert out.count("compile: ") == 1, out[-3000:]  # the compile time, printed once
    assert RECOMPILED not in out, out[-3000:]


def test_compiled_single_process_matches_eager(tmp_path, eager, capsys):
    run = tmp_path / "run"
    assert cli_train(parallel_overrides(run, **COMPILE)) == 0
    check_compiled_run(run, capsys.readouterr().out, eager)


LAYOUTS = {
    "dp2-zero3": {"parallel.zero_stage": 3},
    "dp2-zero1-selective-ac": {"parallel.zero_stage": 1,
                               "parallel.activation_checkpointing": "selective"},
    "pp2": {"parallel.pp": 2},
    "tp2-sp": {"parallel.tp": 2, "parallel.sequence_parallel": True},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_compiled_layout_matches_single_process_eager(name, tmp_path, eager):
    run = tmp_path / name
    r = run_train(parallel_overrides(run, **COMPILE, **LAYOUTS[name]), nproc=2, timeout=400)
    check_compiled_run(run, r.stdout, eager)


def test_tensor_parallel_compile_accepted_moe_refused():
    """tp (+SP) compiles dense blocks (tp2-sp above); an MoE model under tp is refused in one line
    (config/validate.py: its blocks recompile every step)."""
    from llmtrain.config import ConfigError, load_config
    tp2 = ["parallel.compile=true", "parallel.tp=2", "model.n_heads=4"]
    load_config(None, [*tp2, "parallel.sequence_parallel=true"], world_size=2)
    with pytest.raises(ConfigError) as e:
        load_config(None, [*tp2, "model.moe.num_experts=4"], world_size=2)
    assert str(e.value).startswith("parallel.compile=true with parallel.tp=2 and "
                                   "model.moe.num_experts=4 is not supported")
    assert "\n" not in str(e.value)
