"""`parallel.compile: true` (parallel/compile.py): per-block torch.compile trains like the eager
model, per-step losses within 1e-5 relative (fp32) of the single-process eager run, on one process
(the plain loss compiled too, or the fused loss beside the compiled blocks) and at dp2 ZeRO-3, dp2 ZeRO-1 with selective activation checkpointing, pp2 and tp2 with sequence
parallelism (the first block's input is then an AsyncCollectiveTensor, which the compiled block
must hand its gradient: parallel/compile.py), and an encoder-decoder at tp2 (both stacks compiled,
their inputs the tied vocab-parallel embedding's all-reduced output). Each run prints its compile
time once, and no training step after the second compiles a graph (the recompilation guard:
CompileClock's warning, read from the run's output).

Inductor compiles C++ here (tens of seconds per process on a cold cache): one eager reference
per model, six compiled runs, the smallest models the other layout tests use."""

from __future__ import annotations

import re

import pytest

from helpers import cli_train, parallel_overrides, read_losses, run_train

# untied, so that the pipeline layout can split it (tied embeddings are refused with pp > 1)
MODEL = {"model.tie_embeddings": False}
# the tiny T5 of test_encoder_decoder_train.py (tied embeddings; pp and SP are refused for it)
ENCODER_DECODER = {"model.arch": "encoder_decoder", "model.n_encoder_layers": 2,
                   "model.n_decoder_layers": 2, "model.position": "t5_relative",
                   "model.activation": "geglu"}
MODELS = {"decoder": MODEL, "encoder-decoder": ENCODER_DECODER}
COMPILE = {"parallel.compile": True}
RECOMPILED = "warning: torch.compile compiled"


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    """`eager(model)`: the losses of the single-process eager run of MODELS[model] that every
    compiled run of it is compared with (trained once per model)."""
    root, losses = tmp_path_factory.mktemp("eager"), {}

    def get(model: str = "decoder") -> list[float]:
        if model not in losses:
            run = root / model
            assert cli_train(parallel_overrides(run, **MODELS[model])) == 0
            losses[model] = read_losses(run)
        return losses[model]
    return get


def check_compiled_run(run, out: str, eager: list[float], graphs: int | None = None) -> None:
    assert read_losses(run) == pytest.approx(eager, rel=1e-5)
    printed = re.findall(r"compile: (\d+) graphs", out)
    assert len(printed) == 1, out[-3000:]  # the compile time, printed once
    assert graphs is None or int(printed[0]) == graphs, out[-3000:]
    assert RECOMPILED not in out, out[-3000:]


@pytest.mark.parametrize("loss", ["plain", "fused"])
def test_compiled_single_process_matches_eager(tmp_path, eager, capsys, loss):
    """The plain loss compiled too; the fused one (train/lean_loss.py) eager beside the compiled
    blocks, against the eager plain run."""
    run = tmp_path / "run"
    assert cli_train(parallel_overrides(run, **MODEL, **COMPILE, **{"train.loss": loss})) == 0
    check_compiled_run(run, capsys.readouterr().out, eager())


LAYOUTS = {  # name: (model, layout, graphs compiled on rank 0 or None: not checked)
    "dp2-zero3": ("decoder", {"parallel.zero_stage": 3}, None),
    "dp2-zero1-selective-ac": ("decoder", {"parallel.zero_stage": 1,
                                           "parallel.activation_checkpointing": "selective"},
                               None),
    "pp2": ("decoder", {"parallel.pp": 2}, None),
    "tp2-sp": ("decoder", {"parallel.tp": 2, "parallel.sequence_parallel": True}, None),
    # 3 graphs: the encoder block, the decoder block (every layer of a stack reuses its stack's
    # graph) and the vocab-parallel loss
    "encoder-decoder-tp2": ("encoder-decoder", {"parallel.tp": 2}, 3),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_compiled_layout_matches_single_process_eager(name, tmp_path, eager):
    model, layout, graphs = LAYOUTS[name]
    run = tmp_path / name
    r = run_train(parallel_overrides(run, **MODELS[model], **COMPILE, **layout), nproc=2,
                  timeout=400)
    check_compiled_run(run, r.stdout, eager(model), graphs)


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
