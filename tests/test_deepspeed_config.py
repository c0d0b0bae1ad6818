"""DeepSpeed config generation and merging (no DeepSpeed run needed)."""

from __future__ import annotations

import json

import pytest

from helpers import as_overrides
from llmtrain.config import ConfigError, load_config
from llmtrain.engines.deepspeed import build_config


def cfg_with(tmp_path, user: dict | None = None, **extra):
    sets = {"train.global_batch_size": 16, "train.micro_batch_size": 4,
            "parallel.zero_stage": 0, "train.precision": "bf16", "train.grad_clip": 0.5}
    sets.update(extra)
    cfg = load_config(None, as_overrides(sets))
    if user is not None:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(user))
        cfg.parallel.deepspeed_config = str(path)
    return cfg


def test_generated_config_follows_the_run_config(tmp_path):
    ds, conflicts = build_config(cfg_with(tmp_path), dp_size=2)
    assert conflicts == []
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2  # 16 / (4 x 2)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True}


def test_user_values_stand_ours_fill_gaps_and_conflicts_are_reported(tmp_path):
    user = {"gradient_clipping": 2.0, "zero_optimization": {"stage": 0, "overlap_comm": True},
            "train_batch_size": "auto"}
    ds, conflicts = build_config(cfg_with(tmp_path, user), dp_size=2)
    assert ds["gradient_clipping"] == 2.0
    assert ds["zero_optimization"] == {"stage": 0, "overlap_comm": True}
    assert ds["train_batch_size"] == 16, "'auto' takes ours"
    assert ds["bf16"] == {"enabled": True}, "unset by the user: ours"
    assert conflicts == ["gradient_clipping: the DeepSpeed config says 2.0, llmtrain's config "
                         "implies 0.5; keeping 2.0"]


def test_batch_size_disagreement_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu=8 disagrees"):
        build_config(cfg_with(tmp_path, {"train_micro_batch_size_per_gpu": 8}), dp_size=2)


def test_offload_uses_deepspeeds_optimizer(tmp_path):
    ds, _ = build_config(cfg_with(tmp_path, **{"parallel.zero_stage": 0}), dp_size=1)
    assert "optimizer" not in ds
    cfg = cfg_with(tmp_path)
    cfg.parallel.offload, cfg.parallel.zero_stage = "cpu", 3
    ds, _ = build_config(cfg, dp_size=1)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["optimizer"]["type"] == "AdamW"


def test_missing_or_bad_user_json(tmp_path):
    cfg = cfg_with(tmp_path)
    cfg.parallel.deepspeed_config = str(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(cfg, 1)
    (tmp_path / "bad.json").write_text("{")
    cfg.parallel.deepspeed_config = str(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        build_config(cfg, 1)


@pytest.mark.parametrize("user, message", [
    ({"checkpoint": {"load_universal": True}}, "sets checkpoint.load_universal"),
    ([1, 2], "must hold a JSON object"),
])
def test_user_configs_that_would_unpickle_or_crash_are_refused(tmp_path, user, message):
    """DeepSpeed reads universal checkpoints with torch.load(weights_only=False), past the
    allow-listed loader llmtrain gives it."""
    with pytest.raises(ConfigError, match=message):
        build_config(cfg_with(tmp_path, user), dp_size=2)
