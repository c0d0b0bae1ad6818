"""Checkpoint integrity: the manifest catches truncation and bit flips, `resume: auto` falls
back to the newest intact checkpoint, interrupted saves are ignored, and loading unpickles
nothing but DCP's own metadata classes."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides
from llmtrain.cli import main
from llmtrain.config import ConfigError, load_config
from llmtrain.model import build_model
from llmtrain.train import checkpoint as ckpt

SHARD = "__0_0.distcp"


def train(run: Path, steps: int, capsys=None) -> str:
    overrides = tiny_overrides(run, **{"train.steps": steps, "checkpoint.every": 2,
                                       "checkpoint.keep_last": 0})
    assert main(["train", *sum((["--set", o] for o in overrides), [])]) == 0
    if capsys is None:
        return ""
    captured = capsys.readouterr()
    return captured.out + captured.err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run with checkpoints step_2 and step_4 (copied per test before damaging it)."""
    run = tmp_path_factory.mktemp("ckpt") / "run"
    train(run, 4)
    return run


@pytest.fixture
def run(trained, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    # config.yaml names the original run_dir; point it at the copy
    text = (dst / "config.yaml").read_text().replace(str(trained), str(dst))
    (dst / "config.yaml").write_text(text)
    return dst


def config(run: Path):
    return load_config(run / "config.yaml")


def truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def flip_byte(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))


def test_manifest_lists_every_file(run):
    step = run / "checkpoints" / "step_4"
    files = json.loads((step / ckpt.MANIFEST).read_text())["files"]
    assert set(files) == {p.name for p in step.iterdir()} - {ckpt.MANIFEST}
    assert {".metadata", SHARD, "meta.json", "rng_rank0.pt"} <= set(files)
    ckpt.verify(step)


@pytest.mark.parametrize("damage, what", [(truncate, "truncated"), (flip_byte, "corrupted")])
@pytest.mark.parametrize("name", [SHARD, ".metadata", "rng_rank0.pt"])
def test_damage_is_detected_naming_the_file(run, damage, what, name):
    step = run / "checkpoints" / "step_4"
    damage(step / name)
    with pytest.raises(ConfigError) as e:
        ckpt.verify(step)
    msg = str(e.value)
    assert str(step / name) in msg and what in msg and "\n" not in msg
    cfg = config(run)
    model = build_model(cfg.model)
    with pytest.raises(ConfigError, match=what):
        ckpt.load(step, model, torch.optim.AdamW(model.parameters()), cfg, torch.device("cpu"))


def test_explicit_damaged_checkpoint_is_a_one_line_cli_error(run, capsys):
    step = run / "checkpoints" / "step_4"
    flip_byte(step / SHARD)
    overrides = tiny_overrides(run, **{"train.steps": 6, "checkpoint.resume": str(step)})
    assert main(["train", *sum((["--set", o] for o in overrides), [])]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: checkpoint file") and SHARD in err


def test_resume_auto_falls_back_to_previous_good(run, capsys):
    truncate(run / "checkpoints" / "step_4" / SHARD)
    warnings = []
    assert ckpt.find_resume(config(run), log=warnings.append) == run / "checkpoints" / "step_2"
    assert len(warnings) == 1 and "step_4" in warnings[0] and SHARD in warnings[0]

    # through the CLI: the warning names the bad checkpoint, training resumes at step 2
    capsys.readouterr()
    out = train(run, 6, capsys)
    assert "damaged checkpoint" in out and "step_4" in out
    assert f"resumed from {run / 'checkpoints' / 'step_2'} at step 2" in out
    ckpt.verify(run / "checkpoints" / "step_4")  # rewritten by the resumed run
    assert ckpt.find_resume(config(run)) == run / "checkpoints" / "step_6"


def test_no_intact_checkpoint_is_an_error(run):
    for step in ("step_2", "step_4"):
        flip_byte(run / "checkpoints" / step / SHARD)
    with pytest.raises(ConfigError, match="no intact checkpoint.*resume=none"):
        ckpt.find_resume(config(run), log=lambda m: None)


def test_interrupted_save_is_ignored(run):
    ckpts = run / "checkpoints"
    tmp = ckpts / ".step_6.tmp"
    shutil.copytree(ckpts / "step_4", tmp)
    (tmp / ckpt.MANIFEST).unlink()  # killed before the manifest and the rename
    truncate(tmp / SHARD)
    (ckpts / "step_8").mkdir()  # a directory that never got its meta.json
    assert ckpt.list_checkpoints(ckpts) == [ckpts / "step_2", ckpts / "step_4"]
    assert ckpt.find_resume(config(run)) == ckpts / "step_4"


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.makedirs, (str(self.marker),)


def test_loading_unpickles_no_foreign_objects(run, tmp_path):
    """A `.metadata` whose pickle calls os.makedirs (consistent with its manifest, as a crafted
    download would be) is refused without running the call."""
    step = run / "checkpoints" / "step_4"
    marker = tmp_path / "pwned"
    (step / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    ckpt.write_manifest(step)
    cfg = config(run)
    model = build_model(cfg.model)
    with pytest.raises(ConfigError, match="not valid DCP metadata.*os"):
        ckpt.load(step, model, torch.optim.AdamW(model.parameters()), cfg, torch.device("cpu"))
    assert not marker.exists()
