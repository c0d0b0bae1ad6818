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

from helpers import cli_train, cut_back, load_dcp, read_losses, set_args, tiny_overrides
from llmtrain.cli import main
from llmtrain.config import ConfigError, load_config
from llmtrain.model import build_model
from llmtrain.train import checkpoint as ckpt

SHARD = "__0_0.distcp"


def train(run: Path, steps: int, capsys=None) -> str:
    assert cli_train(tiny_overrides(run, **{"train.steps": steps, "checkpoint.every": 2,
                                            "checkpoint.keep_last": 0})) == 0
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
    assert cli_train(tiny_overrides(run, **{"train.steps": 6, "checkpoint.resume": str(step)})) == 2
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


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _call(module: str, name: str, arg: str) -> bytes:
    """Pickle opcodes for `module.name(arg)` (the name may be a dotted attribute path)."""
    return _global(module, name) + b"(V" + arg.encode() + b"\ntR"


_META = "torch.distributed.checkpoint.metadata"

# Each writes `marker` if its call runs. Protocol 4 resolves dotted names in find_class.
GADGETS = {
    "reduce": lambda m: pickle.dumps(_Payload(m)),
    "attribute path through an allowed module": lambda m: b"\x80\x04" + _call(
        _META, "os.makedirs.__call__", str(m)) + b".",
    "module named by an allowed module": lambda m: b"\x80\x04" + _global(_META, "os") + b".",
    "builtins": lambda m: b"\x80\x04" + _call("builtins", "exec", f"import os; os.makedirs("
                                                                    f"{str(m)!r})") + b".",
    "nested in a dict": lambda m: b"\x80\x04}(Vstorage_data\n" + _call(
        _META, "os.makedirs.__call__", str(m)) + b"u.",
    "torch attribute": lambda m: b"\x80\x04" + _call("torch", "serialization.os.makedirs",
                                                      str(m)) + b".",
    "setting attributes of an allowed class": lambda m: b"\x80\x04" + _global(_META, "Metadata")
        + b"N}V__repr__\n" + _global("torch.serialization", "_get_layout") + b"s\x86b.",
    "reduce on an allowed class": lambda m: b"\x80\x04" + _call(
        "collections", "OrderedDict", "x") + b".",
}


@pytest.mark.parametrize("gadget", list(GADGETS))
def test_loading_unpickles_no_foreign_objects(run, tmp_path, gadget):
    """A `.metadata` crafted to run code or reach foreign names (consistent with its manifest,
    as a crafted download would be) is refused without running anything."""
    from torch.distributed.checkpoint.metadata import Metadata
    step = run / "checkpoints" / "step_4"
    marker = tmp_path / "pwned"
    (step / ".metadata").write_bytes(GADGETS[gadget](marker))
    ckpt.write_manifest(step)
    cfg = config(run)
    model = build_model(cfg.model)
    repr_before = Metadata.__repr__
    with pytest.raises(ConfigError, match="not valid DCP metadata"):
        ckpt.load(step, model, torch.optim.AdamW(model.parameters()), cfg, torch.device("cpu"))
    assert not marker.exists()
    assert Metadata.__repr__ is repr_before


def test_storage_records_cannot_point_outside_the_checkpoint(run, tmp_path):
    """Well-formed DCP metadata whose storage record names a file outside the checkpoint."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    step = run / "checkpoints" / "step_4"
    secret = tmp_path / "secret"
    secret.write_bytes(b"x" * 4096)
    meta = ckpt._read_metadata(step / ".metadata")
    key = next(iter(meta.storage_data))
    meta.storage_data[key] = _StorageInfo(f"../../../{secret.name}", 0, 16)
    (step / ".metadata").write_bytes(pickle.dumps(meta))
    ckpt.write_manifest(step)
    with pytest.raises(ConfigError, match="not a shard file"):
        ckpt._read_metadata(step / ".metadata")
    meta.storage_data[key] = _StorageInfo(SHARD, 0, 10**12)  # beyond the shard's end
    (step / ".metadata").write_bytes(pickle.dumps(meta))
    with pytest.raises(ConfigError, match="outside that file"):
        ckpt._read_metadata(step / ".metadata")


@pytest.mark.parametrize("command", ["train", "generate", "export"])
def test_crafted_checkpoint_runs_nothing_from_the_cli(run, tmp_path, capsys, command):
    """Resume, generate and export of a checkpoint with a code-running `.metadata`: exit 2 with
    one line, and the call never ran."""
    step = run / "checkpoints" / "step_4"
    marker = tmp_path / "pwned"
    (step / ".metadata").write_bytes(GADGETS["attribute path through an allowed module"](marker))
    ckpt.write_manifest(step)
    args = {"train": ["train", *set_args(tiny_overrides(
                run, **{"train.steps": 6, "checkpoint.resume": str(step)}))],
            "generate": ["generate", str(step), "--prompt", "def"],
            "export": ["export", str(step), "--format", "hf", "--out", str(tmp_path / "hf")]}
    capsys.readouterr()
    assert main(args[command]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not valid DCP metadata" in err[0], err
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# checkpoint.async


def test_async_save_returns_before_the_write_and_snapshots_the_state(tmp_path, monkeypatch):
    """The save returns after staging while the write is held back; the training state changed
    after that is not in the checkpoint; once written it is published intact."""
    import threading

    from torch.distributed.checkpoint import FileSystemWriter
    release, writing = threading.Event(), threading.Event()
    write_data = FileSystemWriter.write_data

    def held_write(self, *args, **kwargs):
        writing.set()
        assert release.wait(60), "the test never released the write"
        return write_data(self, *args, **kwargs)
    monkeypatch.setattr(FileSystemWriter, "write_data", held_write)

    cfg = load_config(None, tiny_overrides(tmp_path / "run"))
    model = build_model(cfg.model)
    from llmtrain.train.optim import build_optimizer
    opt = build_optimizer(model, cfg.optim)
    model(torch.randint(0, 1024, (2, 8))).float().mean().backward()
    opt.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saver = ckpt.AsyncSaver()
    root = tmp_path / "ckpts"
    final = saver.save(root, 7, model, opt, cfg, torch.device("cpu"), {"tokens": 0})
    try:
        assert writing.wait(30) and saver.in_flight == 7
        assert not final.exists() and (root / ".step_7.tmp").is_dir()  # written, not published
        with torch.no_grad():  # training goes on while the write is held back
            for p in model.parameters():
                p.add_(1.0)
    finally:
        release.set()
    saver.close()
    assert saver.in_flight is None and ckpt.list_checkpoints(root) == [final]
    ckpt.verify(final)
    fresh = build_model(cfg.model)
    ckpt.load_model(final, fresh)
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_async_checkpoints_resume_like_synchronous_ones(tmp_path):
    """Async saves every 2 steps: each published checkpoint equals the synchronous run's, and
    resuming from step 4 reproduces the synchronous run's losses."""
    common = {"train.steps": 6, "checkpoint.every": 2, "checkpoint.keep_last": 0,
              "model.dropout": 0.0}
    runs = {}
    for name, extra in (("sync", {}), ("async", {"checkpoint.async": True})):
        run = tmp_path / name
        assert cli_train(tiny_overrides(run, **common, **extra)) == 0
        runs[name] = run
    steps = [p.name for p in ckpt.list_checkpoints(runs["async"] / "checkpoints")]
    assert steps == ["step_2", "step_4", "step_6"]
    for step in steps:
        ckpt.verify(runs["async"] / "checkpoints" / step)
        got = {name: load_dcp(runs[name] / "checkpoints" / step, tmp_path / f"{name}.pt")
               for name in ("sync", "async")}
        for part in ("model", "optim"):
            assert got["async"][part].keys() == got["sync"][part].keys()
        for k, v in got["sync"]["model"].items():
            torch.testing.assert_close(got["async"]["model"][k], v, rtol=0, atol=0)

    run = runs["async"]
    cut_back(run, 4, 6)
    assert cli_train(tiny_overrides(run, **common, **{"checkpoint.async": True})) == 0
    assert read_losses(run) == pytest.approx(read_losses(runs["sync"]), rel=1e-6)


def test_failed_async_save_is_reported_and_training_goes_on(tmp_path, monkeypatch, capsys):
    """The background write of step 4 fails (disk full): a warning at the next save names the
    step, its partial directory is gone, step 2 and the final step 6 are intact."""
    from torch.distributed.checkpoint import FileSystemWriter
    write_data = FileSystemWriter.write_data

    def full_disk(self, *args, **kwargs):
        if ".step_4.tmp" in str(self.path):
            raise OSError(28, "No space left on device")
        return write_data(self, *args, **kwargs)
    monkeypatch.setattr(FileSystemWriter, "write_data", full_disk)
    run = tmp_path / "run"
    assert cli_train(tiny_overrides(run, **{"train.steps": 6, "checkpoint.every": 2,
                                            "checkpoint.keep_last": 0,
                                            "checkpoint.async": True})) == 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert "background save of step 4 failed" in text and "No space left on device" in text
    assert "last good checkpoint: " in text and "step_2" in text
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_2", "step_6"]
    assert not (run / "checkpoints" / ".step_4.tmp").exists()
    for p in ckpt.list_checkpoints(run / "checkpoints"):
        ckpt.verify(p)


def test_config_hash_of_a_default_run_is_unchanged_by_keys_added_since():
    """Checkpoints written before data.skip_bad_lines existed must still resume: the default
    run's hash as llmtrain 022d74e computed it."""
    from llmtrain.config import Config
    assert ckpt.config_hash(Config()) == "3c39c47f4d2c3e05"
    # model-only checkpoints (init_from, import-hf's step_0) match on the architecture alone
    assert ckpt.arch_hash(Config()) == "bcdae7eaba5d58f5"  # as llmtrain 9b364ca computed it
    for key, value in (("attention_window", 8), ("qk_norm", True), ("logit_softcap", 30.0)):
        cfg = Config()
        setattr(cfg.model, key, value)
        assert ckpt.config_hash(cfg) != "3c39c47f4d2c3e05" and \
            ckpt.arch_hash(cfg) != "bcdae7eaba5d58f5", key
    cfg = Config()
    cfg.data.skip_bad_lines = True  # a different corpus: a different run
    assert ckpt.config_hash(cfg) != "3c39c47f4d2c3e05"


@pytest.mark.parametrize("manifest, message", [
    ({"files": {"../../outside": {"size": 4, "sha256": "0" * 64}}}, "outside the checkpoint"),
    ({"files": {"/etc/hostname": {"size": 4, "sha256": "0" * 64}}}, "outside the checkpoint"),
    ({"files": [".metadata"]}, "not a valid manifest"),
    ({"files": {".metadata": {"size": "4"}}}, "not a valid manifest"),
    ([], "not a JSON object"),
])
def test_a_crafted_manifest_is_refused_in_one_line(run, manifest, message):
    step = run / "checkpoints" / "step_4"
    (step / ckpt.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=message):
        ckpt.verify(step)


def test_a_meta_json_that_is_not_an_object_is_one_line(run, capsys):
    step = run / "checkpoints" / "step_4"
    (step / "meta.json").write_text("[1, 2]")
    ckpt.write_manifest(step)
    assert cli_train(tiny_overrides(run, **{"train.steps": 6, "checkpoint.resume": str(step)})) == 2
    assert "meta.json is corrupted (not a JSON object" in capsys.readouterr().err
