"""Config errors: one line naming the key path, the value and what is valid; exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from llmtrain.cli import main
from llmtrain.config import Config, ConfigError, load_config

ROOT = Path(__file__).parent.parent


@pytest.mark.parametrize("overrides, expected", [
    (["model.n_head=4"], "unknown config key model.n_head; did you mean model.n_heads?"),
    (["train.stepz=4"], "did you mean train.steps?"),
    (["model.d_model=abc"], "model.d_model='abc' has the wrong type; expected an integer"),
    (["model.norm=batchnorm"], "model.norm='batchnorm' is not valid; use one of: layernorm, rmsnorm"),
    (["optim.lr=-1"], "optim.lr=-1.0 is out of range; must be > 0.0"),
    (["model.n_heads=4", "model.n_kv_heads=3"],
     "model.n_kv_heads=3 does not divide model.n_heads=4; use one of 1, 2, 4"),
    (["model.d_model=100", "model.n_heads=3"],
     "model.n_heads=3 does not divide model.d_model=100; use one of 1, 2, 4, 5, 10, 20, 25, 50, 100"),
    (["train.seq_len=512"], "train.seq_len=512 exceeds model.max_seq_len=256"),
    (["train.global_batch_size=10", "train.micro_batch_size=4"],
     "train.global_batch_size=10 is not divisible by train.micro_batch_size=4 x data-parallel size 1"),
])
def test_config_errors_are_one_line(overrides, expected, capsys, tmp_path):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(None, overrides)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)
    code = main(["train", "--set", *sum((["--set", o] for o in overrides), [])[1:],
                 "--set", f"logging.run_dir={tmp_path}/run"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err
    assert not (tmp_path / "run").exists(), "a rejected config must write nothing"


def test_global_batch_checks_data_parallel_size():
    with pytest.raises(ConfigError, match="micro_batch_size=4 x data-parallel size 2"):
        load_config(None, ["train.global_batch_size=12", "train.micro_batch_size=4"],
                    world_size=2)


def test_overrides_are_typed():
    cfg = load_config(None, ["optim.lr=1e-3", "train.steps=7", "model.tie_embeddings=false",
                             "data.paths=[a, b]", "data.source=files"])
    assert cfg.optim.lr == 1e-3 and cfg.train.steps == 7 and cfg.model.tie_embeddings is False
    assert cfg.data.paths == ["a", "b"]


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {d_model: 64\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_tiny_yaml_equals_embedded_default():
    """`llmtrain train` with no config and with configs/tiny.yaml are the same run."""
    assert load_config(ROOT / "configs" / "tiny.yaml").to_dict() == Config().to_dict()


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    load_config(ROOT / "configs" / name)


def test_cli_exit_code_and_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "llmtrain", "train", "--set", "model.n_layer=2",
                        "--set", f"logging.run_dir={tmp_path}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: unknown config key model.n_layer; did you mean model.n_layers?"
