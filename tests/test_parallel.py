"""Multi-rank training on the CPU (gloo, processes spawned by torchrun) against the single-process
run with the same global batch: per-step losses within 1e-5 relative (fp32) and the final
weights after gathering (DCP checkpoints converted to one torch file), plus per-rank model-state
bytes at each ZeRO stage and resume with ZeRO-1 optimizer-state sharding."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from helpers import (ATOL, PARALLEL_STEPS, assert_weights_close, cli_train, cut_back,
                     final_weights, launch_script, parallel_overrides, read_losses, run_train,
                     tiny_overrides)
from llmtrain.config import ConfigError, load_config
from llmtrain.planner.compute import H100_SXM
from llmtrain.planner.search import Layout, estimate

STEPS = PARALLEL_STEPS
# the reference each layout is compared with: model overrides shared by both runs
MODELS = {"mha": {}, "gqa": {"model.n_kv_heads": 2}, "mqa": {"model.n_kv_heads": 1}}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Single-process runs (one per model variant), built once for the whole module."""
    root = tmp_path_factory.mktemp("reference")
    cache = {}

    def get(model: str) -> tuple[list[float], dict[str, torch.Tensor]]:
        if model not in cache:
            run = root / model
            assert cli_train(parallel_overrides(run, **MODELS[model])) == 0
            cache[model] = read_losses(run), final_weights(run, STEPS)
        return cache[model]
    return get


LAYOUTS = {
    # name: (processes, parallel overrides, reference model)
    "dp2-zero0": (2, {"parallel.zero_stage": 0}, "mha"),
    "dp2-zero1": (2, {"parallel.zero_stage": 1}, "mha"),
    "dp2-zero2": (2, {"parallel.zero_stage": 2}, "mha"),
    "dp2-zero3": (2, {"parallel.zero_stage": 3}, "mha"),
    "tp2-sp": (2, {"parallel.tp": 2, "parallel.sequence_parallel": True}, "mha"),
    "tp2-gqa": (2, {"parallel.tp": 2}, "gqa"),
    "tp2-mqa-sp": (2, {"parallel.tp": 2, "parallel.sequence_parallel": True}, "mqa"),
    "tp2xdp2-zero0": (4, {"parallel.tp": 2, "parallel.zero_stage": 0}, "gqa"),
    "tp2xdp2-zero1": (4, {"parallel.tp": 2, "parallel.zero_stage": 1,
                          "parallel.sequence_parallel": True}, "mha"),
    "tp2xdp2-zero3": (4, {"parallel.tp": 2, "parallel.zero_stage": 3,
                          "parallel.sequence_parallel": True}, "mha"),
    "hsdp2x2-zero2": (4, {"parallel.dp_replicate": 2, "parallel.zero_stage": 2,
                          "train.micro_batch_size": 2}, "mha"),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, tmp_path, reference):
    nproc, par, model = LAYOUTS[name]
    ref_losses, ref_weights = reference(model)
    run = tmp_path / name
    r = run_train(parallel_overrides(run, **MODELS[model], **par), nproc=nproc)
    assert "layout: world" in r.stdout and "model state:" in r.stdout
    assert read_losses(run) == pytest.approx(ref_losses, rel=1e-5)
    assert_weights_close(final_weights(run, STEPS), ref_weights)

    mem = [json.loads((run / f"memory_rank{i}.json").read_text()) for i in range(nproc)]
    full = 4 * mem[0]["n_params"]  # fp32 bytes of every parameter once
    zero = par.get("parallel.zero_stage", 0)
    tp = par.get("parallel.tp", 1)
    dp_shard = nproc // tp // par.get("parallel.dp_replicate", 1)  # ranks that split the states
    # how many ways each state is split: tp always; over dp_shard from the ZeRO stage that
    # shards it (FSDP2 keeps stage-2 parameters sharded between steps too)
    p_split = tp * (dp_shard if zero >= 2 else 1)
    o_split = tp * (dp_shard if zero >= 1 else 1)
    largest = 4 * 1024 * 64 // tp  # the (vocab-parallel) embedding, the largest parameter
    for m in mem:
        if model == "mqa":  # TP keeps the single kv head's wk/wv whole on every rank
            assert full / p_split < m["param_bytes"] < 0.6 * full
            continue
        assert m["param_bytes"] == pytest.approx(full / p_split, rel=0.01)
        assert m["grad_bytes"] == pytest.approx(full / p_split, rel=0.01)
        if zero == 1:  # whole-tensor partitions (ZeroRedundancyOptimizer, PartitionedAdamW)
            assert abs(m["optim_bytes"] - 2 * full / o_split) <= 2 * largest
        else:
            assert m["optim_bytes"] == pytest.approx(2 * full / o_split, rel=0.01)
    if zero == 1 and tp == 1:
        assert sum(m["optim_bytes"] for m in mem) == 2 * full, "every state on exactly one rank"

    # `llmtrain plan`'s model-state estimate against these measured per-rank bytes (within 5%)
    cfg = load_config(None, parallel_overrides(run, **MODELS[model], **par), world_size=nproc)
    est = estimate(cfg, Layout.from_config(cfg, nproc), H100_SXM).memory
    for key, measured in (("params", "param_bytes"), ("grads", "grad_bytes"),
                          ("optimizer", "optim_bytes")):
        if key == "params" and zero == 2:
            continue  # the planner counts stage 2's peak (FSDP2 holds all parameters from
            # forward to backward); measured here is between steps, sharded
        mean = sum(m[measured] for m in mem) / nproc  # ZeRO-1 splits whole tensors: the mean
        assert mean == pytest.approx(est[key], rel=0.05), (key, mean, est[key])


def test_zero1_resume_reproduces_losses_and_weights(tmp_path, reference):
    """dp=2 ZeRO-1 (per-rank optimizer partitions in DCP): stop after the step-3 checkpoint,
    resume to step 5; losses and weights equal the uninterrupted single-process run."""
    ref_losses, ref_weights = reference("mha")
    run = tmp_path / "zero1"
    args = parallel_overrides(run, **{"parallel.zero_stage": 1, "checkpoint.every": 3})
    run_train(args, nproc=2)
    cut_back(run, 3, STEPS)
    r = run_train(args, nproc=2)
    assert "resumed from" in r.stdout
    assert read_losses(run) == pytest.approx(ref_losses, rel=1e-5)
    assert_weights_close(final_weights(run, STEPS), ref_weights)


def test_zero3_bf16_with_cpu_offload_trains(tmp_path):
    """MixedPrecisionPolicy (bf16 params, fp32 reduction) at dp=2; offload=cpu is accepted (the
    CPUOffloadPolicy itself needs an accelerator and is applied only on GPU runs)."""
    run = tmp_path / "bf16"
    run_train(parallel_overrides(run, **{"parallel.zero_stage": 3, "train.precision": "bf16",
                                         "parallel.offload": "cpu", "optim.lr": 0.01}), nproc=2)
    losses = read_losses(run)
    assert all(x == x for x in losses) and losses[-1] < losses[0]


@pytest.mark.parametrize("sets, world, message", [
    ({"parallel.tp": 3}, 3, "parallel.tp=3 does not divide model.n_heads=4; use 1, 2, 4"),
    ({"parallel.tp": 4, "model.n_kv_heads": 2}, 4,
     "parallel.tp=4 does not divide model.n_kv_heads=2"),
    ({"parallel.tp": 2, "parallel.sequence_parallel": True, "train.seq_len": 31}, 2,
     "sequence_parallel needs train.seq_len=31 divisible by parallel.tp=2"),
    ({"parallel.offload": "cpu", "parallel.zero_stage": 2}, 2, "offload=cpu needs"),
    ({"parallel.tp": 2, "parallel.dp_shard": 2}, 2, "does not match the world size 2"),
    ({"parallel.pp": 2}, 2, "tie_embeddings=true with parallel.pp > 1"),
    ({"parallel.ep": 2}, 2, "parallel.ep"),
])
def test_bad_layouts_are_refused_before_any_group(tmp_path, sets, world, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, parallel_overrides(tmp_path, **sets), world_size=world)


def test_torchrun_script_prints_and_passes_overrides(tmp_path):
    r = launch_script("torchrun.sh", "configs/tiny.yaml", "--set", "parallel.tp=2",
                      NPROC_PER_NODE="2", LLMTRAIN_DRY_RUN="1")
    assert r.returncode == 0, r.stderr
    assert "--nproc_per_node 2" in r.stdout and "--set parallel.tp=2" in r.stdout


RESHARD_TARGETS = {
    # name: (processes, parallel overrides of the resumed job)
    "dp4-zero1": (4, {"parallel.zero_stage": 1, "train.micro_batch_size": 2}),
    "pp2": (2, {"parallel.pp": 2}),
    "tp2xdp2-zero1": (4, {"parallel.tp": 2, "parallel.zero_stage": 1}),  # PartitionedAdamW
    "single": (1, {}),
}


@pytest.fixture(scope="module")
def resharded_source(tmp_path_factory):
    """A 10-step single-process reference, and the same run at tp=2 x dp=2 (ZeRO-3, sequence
    parallel) cut back to its step-5 checkpoint as if killed there."""
    root = tmp_path_factory.mktemp("reshard")
    # untied embeddings: the pp=2 target puts the embedding and the output layer on two stages
    steps = {"train.steps": 10, "checkpoint.every": 5, "model.tie_embeddings": False}
    ref = root / "ref"
    assert cli_train(tiny_overrides(ref, **steps)) == 0
    src = root / "tp2xdp2"
    run_train(tiny_overrides(src, **steps, **{"parallel.tp": 2, "parallel.zero_stage": 3,
                                              "parallel.sequence_parallel": True}), nproc=4)
    for step in (5, 10):  # what the layout saved is the single-process run's state
        saved, expected = final_weights(src, step), final_weights(ref, step)
        for k in expected:
            torch.testing.assert_close(saved[k], expected[k], rtol=1e-4, atol=ATOL)
    cut_back(src, 5, 10)
    return steps, ref, src


@pytest.mark.parametrize("target", list(RESHARD_TARGETS))
def test_checkpoint_reshards_to_another_layout(target, tmp_path, resharded_source):
    """The tp2 x dp2 ZeRO-3 step-5 checkpoint resumed at dp=4 (ZeRO-1), pp=2, tp2 x dp2 ZeRO-1
    and one process:
    steps 6-10 (so weights, optimizer state, schedule and data position) match the uninterrupted
    single-process run, losses within 1e-5 relative and final weights within ATOL."""
    steps, ref, src = resharded_source
    nproc, par = RESHARD_TARGETS[target]
    run = tmp_path / target
    shutil.copytree(src, run)
    out = run_train(tiny_overrides(run, **steps, **par), nproc=nproc)  # 1: without torchrun
    assert "resumed from" in out.stdout and "step_5" in out.stdout
    assert read_losses(run) == pytest.approx(read_losses(ref), rel=1e-5)
    assert_weights_close(final_weights(run, 10), final_weights(ref, 10))


def test_async_checkpoints_with_two_ranks_resume_exactly(tmp_path, reference):
    """dp=2 ZeRO-3 with checkpoint.async (the background writes on their own gloo group): the
    step-2 and step-4 saves are published intact, and resuming from step 4 reproduces the
    single-process run."""
    from llmtrain.train import checkpoint as ckpt
    ref_losses, ref_weights = reference("mha")
    run = tmp_path / "async"
    args = parallel_overrides(run, **{"parallel.zero_stage": 3, "checkpoint.every": 2,
                                      "checkpoint.keep_last": 0, "checkpoint.async": True})
    run_train(args, nproc=2)
    saved = ckpt.list_checkpoints(run / "checkpoints")
    assert [p.name for p in saved] == ["step_2", "step_4", f"step_{STEPS}"]
    for p in saved:
        ckpt.verify(p)
    cut_back(run, 4, STEPS)
    r = run_train(args, nproc=2)
    assert "resumed from" in r.stdout and "step_4" in r.stdout
    assert read_losses(run) == pytest.approx(ref_losses, rel=1e-5)
    assert_weights_close(final_weights(run, STEPS), ref_weights)


def test_fresh_corpus_cache_with_two_ranks(tmp_path):
    """On an empty cache rank 0 trains the tokenizer and writes the corpus while rank 1 waits,
    then both build megatron-core's index cache under one key (a rank-dependent key once made
    rank 1 look for index files nobody wrote)."""
    import random
    rng = random.Random(0)
    words = [f"w{i}" for i in range(300)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(
        json.dumps({"text": " ".join(rng.choices(words, k=200))}) + "\n" for _ in range(200)))
    run = tmp_path / "run"
    run_train(parallel_overrides(run, **{"train.steps": 2, "data.source": "files",
                                         "data.paths": f"[{corpus}]",
                                         "data.cache_dir": str(tmp_path / "cache")}), nproc=2)
    assert len(read_losses(run)) == 2
