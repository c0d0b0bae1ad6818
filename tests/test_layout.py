"""ParallelDims: the parallel layout of a config on a world size, against hand-computed cases,
and the readers (validation, mesh, planner, data loader) that must see the same numbers."""

from __future__ import annotations

import pytest

from llmtrain.config import ConfigError, ParallelDims, config_from_dict, load_config


def dims_of(world_size: int, strict: bool = True, **sections) -> ParallelDims:
    return ParallelDims.from_config(config_from_dict(sections), world_size, strict=strict)


@pytest.mark.parametrize("world, parallel, want", [
    # (pp, dp_replicate, dp_shard, tp): dp_shard=-1 takes what pp x dp_replicate x tp leave
    (1, {}, (1, 1, 1, 1)),
    (8, {}, (1, 1, 8, 1)),
    (16, {"pp": 2, "dp_replicate": 2, "tp": 2}, (2, 2, 2, 2)),
    (24, {"tp": 4, "pp": 3}, (3, 1, 2, 4)),
    (8, {"dp_shard": 4, "tp": 2}, (1, 1, 4, 2)),  # given: kept
])
def test_dp_shard_resolution(world, parallel, want):
    d = dims_of(world, parallel=parallel)
    assert (d.pp, d.dp_replicate, d.dp_shard, d.tp) == want
    assert d.dp == want[1] * want[2] and d.world_size == world and d.fits


@pytest.mark.parametrize("world, parallel, train, micro, pp_micro", [
    (1, {}, {"global_batch_size": 16, "micro_batch_size": 4}, 4, 4),
    # dp = 8 / tp 2 = 4: 64 / (4 x 4)
    (8, {"tp": 2}, {"global_batch_size": 64, "micro_batch_size": 4}, 4, 4),
    # dp = 16 / (pp 2 x tp 2) = 4: 96 / (3 x 4); the schedule's count set apart
    (16, {"pp": 2, "tp": 2, "pp_microbatches": 2}, {"global_batch_size": 96,
                                                    "micro_batch_size": 3}, 8, 2),
    (4, {"dp_replicate": 2}, {"global_batch_size": 8, "micro_batch_size": 4}, 1, 1),
])
def test_micro_batches_per_step(world, parallel, train, micro, pp_micro):
    d = dims_of(world, parallel=parallel, train=train,
                model={"n_layers": 4, "tie_embeddings": False})
    assert (d.micro_batches, d.pp_microbatches) == (micro, pp_micro)


@pytest.mark.parametrize("n_layers, parallel, layers, ranks", [
    # no pipeline: one stage of every layer (virtual_stages is not read at pp=1)
    (5, {}, [[0, 1, 2, 3, 4]], [[0]]),
    (4, {"virtual_stages": 2}, [[0, 1, 2, 3]], [[0]]),
    # 7 layers over 3 stages: the first 7 % 3 = 1 takes one more
    (7, {"pp": 3}, [[0, 1, 2], [3, 4], [5, 6]], [[0], [1], [2]]),
    (6, {"pp": 2, "pp_layers": [1, 5]}, [[0], [1, 2, 3, 4, 5]], [[0], [1]]),
    # 10 layers, 2 ranks x 2 virtual stages: 3, 3, 2, 2; rank r runs stages r and r + 2
    (10, {"pp": 2, "virtual_stages": 2, "pp_schedule": "interleaved_1f1b"},
     [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]], [[0, 2], [1, 3]]),
    (9, {"pp": 2, "virtual_stages": 2, "pp_layers": [4, 1, 1, 3]},
     [[0, 1, 2, 3], [4], [5], [6, 7, 8]], [[0, 2], [1, 3]]),
])
def test_pipeline_stage_split(n_layers, parallel, layers, ranks):
    d = dims_of(parallel.get("pp", 1), parallel=parallel,
                model={"n_layers": n_layers})
    assert [list(s) for s in d.stage_layers] == layers
    assert [list(r) for r in d.pp_rank_stages] == ranks


def test_split_left_empty_where_layers_cannot_be_split():
    """validate() refuses these with its own message; the dims must not build 4096 stages."""
    assert dims_of(4, parallel={"pp": 4}, model={"n_layers": 2}).stage_layers == ()
    assert dims_of(2, parallel={"pp": 2, "pp_layers": [1, 1]},
                   model={"n_layers": 4}).stage_layers == ()
    big = dims_of(2, parallel={"pp": 2, "virtual_stages": 4096}, model={"n_layers": 4})
    assert big.stage_layers == () and big.pp_rank_stages == ()


@pytest.mark.parametrize("world, parallel, message", [
    (8, {"tp": 3}, "parallel layout pp=1 x dp_replicate=1 x dp_shard=-1 x cp=1 x tp=3 = 3 does not "
                   "match the world size 8"),
    (8, {"dp_shard": 2, "tp": 2}, "parallel layout pp=1 x dp_replicate=1 x dp_shard=2 x cp=1 x tp=2 "
                                  "= 4 does not match the world size 8"),
    (2, {"pp": 2, "tp": 2}, "parallel layout pp=2 x dp_replicate=1 x dp_shard=-1 x cp=1 x tp=2 = 4 "
                            "does not match the world size 2"),
])
def test_layout_that_does_not_fit_is_one_line_error(world, parallel, message):
    with pytest.raises(ConfigError) as e:
        dims_of(world, parallel=parallel, model={"n_layers": 4})
    assert str(e.value) == message


def test_lenient_resolution_for_the_planner():
    """strict=False resolves what does not fit (the planner reports it with its other rules)."""
    d = dims_of(8, strict=False, parallel={"tp": 3})
    assert (d.dp_shard, d.fits) == (2, False)
    assert dims_of(8, strict=False, parallel={"tp": 16}).dp_shard == 1  # at least one rank
    assert dims_of(8, strict=False, parallel={"dp_shard": 2, "tp": 2}).dp_shard == 2  # as given


def test_readers_see_the_same_layout():
    """The mesh, the planner's Layout and the data loader read their numbers from ParallelDims."""
    from llmtrain.data.loader import BatchReader
    from llmtrain.parallel.mesh import mesh_shape
    from llmtrain.planner.search import Layout
    cfg = config_from_dict({"model": {"n_layers": 4, "tie_embeddings": False},
                            "parallel": {"pp": 2, "dp_replicate": 2, "tp": 2},
                            "train": {"global_batch_size": 64, "micro_batch_size": 2}})
    d = ParallelDims.from_config(cfg, 32)
    assert (d.dp_shard, d.dp, d.micro_batches) == (4, 8, 4)
    assert mesh_shape(cfg, 32) == {"pp": 2, "dp_replicate": 2, "dp_shard": 4, "cp": 1, "tp": 2}
    lay = Layout.from_config(cfg, 32)
    assert (lay.dp_shard, lay.pp_microbatches, lay.world) == (4, 4, 32)
    assert BatchReader(range(64), cfg, None, dp_rank=1, dp_size=d.dp).n_micro == 4


def test_validation_reads_the_resolved_dp_shard():
    """ep divides dp_shard as resolved from the world size (8 / tp 2 = 4), not as written."""
    moe = ["model.moe.num_experts=8", "parallel.tp=2", "train.global_batch_size=32"]
    assert load_config(None, [*moe, "parallel.ep=4"], world_size=8).parallel.dp_shard == -1
    with pytest.raises(ConfigError, match="parallel.ep=8 must divide the data-parallel shard "
                                          "size 4 "):
        load_config(None, [*moe, "parallel.ep=8"], world_size=8)
