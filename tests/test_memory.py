"""Peak memory above the baseline (train/memory.py, in memory_rank<R>.json): ZeRO-3 over two ranks
holds about half of what one process holds, in every phase, and never the whole model.

The reference is the single-process run of the same model. The model's parameters dominate
(4 layers of d_model 512, 13M parameters, 32-token sequences, micro batch 1), so the expected
ratios are set by the ZeRO formulas, not by noise: a rank initialises its half of the parameters
(the single process all of them), and holds half of the parameters, gradients and AdamW states
plus two gathered blocks in the step. A model materialised whole on every rank before sharding
holds all of the parameters in the init phase, and more (the shards are copied out of them).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from helpers import run_command, run_train, subprocess_env, tiny_overrides

pytestmark = pytest.mark.slow

MODEL = {"model.n_layers": 4, "model.d_model": 512, "model.n_heads": 8, "model.max_seq_len": 32,
         "model.tie_embeddings": False, "train.micro_batch_size": 1, "train.steps": 1,
         "train.eval_steps": 1, "train.precision": "fp32", "parallel.zero_stage": 3}


def peaks(tmp_path, nproc: int) -> dict[str, int]:
    """The largest rank's peak bytes above its baseline, per phase, of a one-step run."""
    run = tmp_path / f"dp{nproc}"
    # glibc returns freed tensors to the OS, so the resident set follows live tensors
    run_train(tiny_overrides(run, **MODEL), nproc=nproc,
              env=subprocess_env(MALLOC_MMAP_THRESHOLD_="65536"))
    recs = [json.loads((run / f"memory_rank{r}.json").read_text()) for r in range(nproc)]
    assert all(r["memory_kind"] == "rss" and r["baseline_bytes"] > 0 for r in recs)
    return {k: max(r["peak_bytes"][k] for r in recs) for k in recs[0]["peak_bytes"]}


def test_zero3_on_two_ranks_holds_about_half_of_one_process(tmp_path):
    one, two = peaks(tmp_path, 1), peaks(tmp_path, 2)
    assert set(one) == {"init", "step", "save", "run"}
    # model states: 13.1M parameters x 16 bytes (fp32 AdamW) = 210 MB in the single process
    assert one["step"] > 200e6
    # init: half the parameters (+ the init's bounded scratch) against all of them; a model
    # materialised whole before sharding reaches at least all of them (ratio >= 1)
    assert two["init"] < 0.8 * one["init"], (one, two)
    # the step: half the states + two gathered blocks (2 x 12.6 MB) ~ 0.6 of one process
    assert two["step"] < 0.75 * one["step"], (one, two)
    assert two["run"] < 0.75 * one["run"], (one, two)


FORK_RANKS = Path(__file__).with_name("fork_ranks.py")


def test_zero3_backward_on_the_cpu_keeps_no_overlap_buffers(tmp_path):
    """On the CPU FSDP2's collectives are synchronous, so parallel/data.py turns off the two
    buffers that only serve overlap (`without_overlap_buffers`): the backward's prefetch of the
    next block (FSDP2's "backward_prefetch" profiler marks) and the reduce-scatter input it keeps
    until the next block's reduction. A 4-block model at ZeRO-3 on 2 ranks, against the same
    model under FSDP2's defaults (what a GPU run keeps). What each held is measured by
    benchmarks/peak_memory.py: one block each (278M parameters, dp8)."""
    run_command([sys.executable, str(FORK_RANKS), "2", "--call", __file__, str(tmp_path)],
                timeout=120)
    for r in range(2):
        rank = json.loads((tmp_path / f"rank{r}.json").read_text())
        # blocks 2, 1, 0 are prefetched by the block after them (block 3 by the root unit,
        # which keeps FSDP2's defaults; it is never resharded after the forward)
        assert rank["defaults"]["prefetched"] == ["layers.2", "layers.1", "layers.0"], rank
        assert rank["lean"]["prefetched"] == [], rank
        # in each block's backward, the reduce-scatter inputs still kept (block 3 runs first)
        assert rank["defaults"]["kept"] == [0, 1, 1, 1], rank
        assert rank["lean"]["kept"] == [0, 0, 0, 0], rank


def _rank(out: str) -> None:
    """One rank: a 4-block decoder at ZeRO-3 on 2 ranks built by `apply_fsdp` (on the CPU:
    without the overlap buffers) and again under FSDP2's defaults; for each, the backward
    prefetches the profiler marks and the reduce-scatter inputs FSDP2 holds in each block's
    backward."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.profiler import ProfilerActivity, profile

    import llmtrain.parallel.data as data
    from llmtrain.config import load_config
    from llmtrain.model import build_model
    from llmtrain.parallel.mesh import MESH_DIMS

    dist.init_process_group("gloo")
    cfg = load_config(None, ["model.n_layers=4", "model.d_model=64", "model.n_heads=4",
                             "model.vocab_size=97", "model.max_seq_len=16", "train.seq_len=16",
                             "parallel.zero_stage=3"])
    mesh = init_device_mesh("cpu", (1, 1, 2, 1, 1), mesh_dim_names=MESH_DIMS)
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(dist.get_rank()))

    def backward(lean: bool) -> dict:
        torch.manual_seed(0)
        model = build_model(cfg.model)
        keep = data.without_overlap_buffers
        if not lean:  # FSDP2's defaults: what apply_fsdp builds on a GPU
            data.without_overlap_buffers = lambda module: None
        try:
            data.apply_fsdp(model, mesh, cfg, torch.device("cpu"))
        finally:
            data.without_overlap_buffers = keep
        kept = []
        for block in model.layers.values():
            block.feed_forward.register_full_backward_pre_hook(lambda *_: kept.append(len(
                model._get_fsdp_state()._comm_ctx.reduce_scatter_states)))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(tokens).float().square().mean().backward()
        mark = "FSDP::backward_prefetch for "
        return {"kept": kept, "prefetched": [
            e.name()[len(mark):] for e in sorted(prof.profiler.kineto_results.events(),
                                                 key=lambda e: e.start_ns())
            if e.name().startswith(mark) and e.name() != mark + "layers.3"]}

    result = {"lean": backward(True), "defaults": backward(False)}
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    _rank(sys.argv[1])
