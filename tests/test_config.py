"""Config errors: one line naming the key path, the value and what is valid; exit code 2."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing

import pytest

from helpers import ROOT, cli_train, run_train
from llmtrain.config import Config, ConfigError, config_from_dict, load_config


def _alias_bomb(levels: int = 9) -> str:
    """'Billion laughs': each list holds the previous one 10 times. YAML keeps one copy of each,
    so the text is small; anything that walks it (repr, asdict, _coerce) visits 10**levels."""
    lists = ["&l0 [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]"] + [
        f"&l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return f"[{', '.join(lists)}]"


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
     "train.global_batch_size=10 is not divisible by train.micro_batch_size=4 x data-parallel size 1; "
     "use a train.micro_batch_size dividing the 10 sequences per data-parallel rank: one of 1, 2, "
     "5, 10"),
    # sizes no real run reaches are refused before anything is allocated (issue 20)
    (["model.d_model=1e11"], "model.d_model=100000000000 is out of range; must be <= 131072"),
    (["model.vocab_size=1e14"],
     "model.vocab_size=100000000000000 is out of range; must be <= 16777216"),
    (["model.n_layers=1000000"], "model.n_layers=1000000 is out of range; must be <= 4096"),
    (["model.max_seq_len=1e9"],
     "model.max_seq_len=1000000000 is out of range; must be <= 16777216"),
    (["model.moe.num_experts=1e9"],
     "model.moe.num_experts=1000000000 is out of range; must be <= 65536"),
    (["parallel.tp=1e7"], "parallel.tp=10000000 is out of range; must be <= 1048576"),
    (["train.steps=1e11"], "train.steps=100000000000 is out of range; must be <= 10000000000"),
    (["train.global_batch_size=1e9"],
     "train.global_batch_size=1000000000 is out of range; must be <= 16777216"),
    (["parallel.pp_layers=[2, 100000]"],
     "parallel.pp_layers[1]=100000 is out of range; must be <= 4096"),
    (["model.d_model=1e300"],
     "model.d_model=<integer of ~301 digits> is out of range; must be <= 131072"),
    # non-finite floats, as YAML floats and as strings _coerce reads as floats
    (["optim.lr=.nan"], "optim.lr=nan must be a finite number"),
    (["optim.lr=nan"], "optim.lr='nan' must be a finite number"),
    (["optim.weight_decay=.inf"], "optim.weight_decay=inf must be a finite number"),
    (["optim.beta1=-.inf"], "optim.beta1=-inf must be a finite number"),
    (["model.norm_eps=1e999"], "model.norm_eps='1e999' must be a finite number"),
    # --set keys and values get the config file's checks
    (["=5"], "--set '=5' has an empty key"),
    (["model..d_model=5"], "--set 'model..d_model=5' has an empty key"),
    (["data.blend=" + _alias_bomb()],
     "--set data.blend: YAML aliases expand to more than 100000 values"),
    (["data.blend=&a [*a]"],
     "--set data.blend: alias *a at line 1 is inside the list or mapping it names"),
    (["data.blend=[{w: 1, w: 2}]"], "--set data.blend: key 'w' appears twice in one mapping"),
    (["data.blend=[[1, a, b]]"],
     "data.blend[0]=[1, 'a', 'b'] is not valid; each entry is [weight, path] with a finite "
     "weight >= 0"),
    (["data.blend=[[.nan, a]]"], "data.blend[0]=[nan, 'a'] is not valid"),
    (["parallel.compile=true", "parallel.engine=deepspeed"],
     "parallel.compile=true with parallel.engine=deepspeed is not supported"),
    # data.split is checked before any corpus is tokenized
    (["data.split=100"], "data.split='100' gives the validation split no share; every run "
                         "trains and evaluates: use e.g. 98,2,0"),
    (["data.split=0/98/2"], "data.split='0/98/2' gives the training split no share"),
    (["data.split=90,10,0,5"], "data.split='90,10,0,5' is not 1 to 3 non-negative shares"),
    (["data.split=-50,150"], "data.split='-50,150' is not 1 to 3 non-negative shares"),
    (["data.split=1.2.3,1"], "data.split='1.2.3,1' is not 1 to 3 non-negative shares"),
])
def test_config_errors_are_one_line(overrides, expected, capsys, tmp_path):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(None, overrides)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)
    code = cli_train([*overrides, f"logging.run_dir={tmp_path}/run"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err
    assert not (tmp_path / "run").exists(), "a rejected config must write nothing"


def test_global_batch_checks_data_parallel_size():
    with pytest.raises(ConfigError, match="micro_batch_size=4 x data-parallel size 2"):
        load_config(None, ["train.global_batch_size=12", "train.micro_batch_size=4"],
                    world_size=2)
    # a global batch that dp does not divide: the hint names the nearest batches that load (a
    # micro batch above a rank's share is cut to it, so 15 and 18 both load at micro 16; at
    # micro 4, 18 and 21 would not)
    for batch, micro, near in ((16, 16, (15, 18)), (20, 4, (12, 24)), (7, 2, (6, 12))):
        sets = ["parallel.dp_shard=3", f"train.micro_batch_size={micro}"]
        with pytest.raises(ConfigError) as e:
            load_config(None, [*sets, f"train.global_batch_size={batch}"], world_size=3)
        assert str(e.value).endswith(
            f"use a global batch divisible by the data-parallel size 3 that loads with this "
            f"micro batch, e.g. {near[0]} or {near[1]}")
        for n in near:
            load_config(None, [*sets, f"train.global_batch_size={n}"], world_size=3)


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
    r = run_train(["model.n_layer=2", f"logging.run_dir={tmp_path}"], timeout=120, check=False)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: unknown config key model.n_layer; did you mean model.n_layers?"


def _bad(name: str, text: str | bytes, expected: str):
    return pytest.param(text, expected, id=name)


@pytest.mark.parametrize("text, expected", [
    _bad("alias-bomb", f"data:\n  blend: {_alias_bomb()}\n",
         "YAML aliases expand to more than 100000 values"),
    _bad("recursive-alias", "data:\n  blend: &a [*a]\n",
         "alias *a at line 2 is inside the list or mapping it names"),
    _bad("duplicate-key", "model:\n  d_model: 64\n  d_model: 128\n",
         "key 'd_model' appears twice in one mapping (lines 2 and 3)"),
    _bad("duplicate-section", "train: {steps: 5}\nmodel: {}\ntrain: {steps: 7}\n",
         "key 'train' appears twice in one mapping (lines 1 and 3)"),
    _bad("deep-nesting", "data:\n  blend: " + "[" * 2000 + "]" * 2000 + "\n",
         "nested more than 32 levels deep at line 2"),
    _bad("python-tag", "model: !!python/object/apply:os.system [echo hi]\n",
         "is not valid YAML at line 1: could not determine a constructor for the tag "
         "'tag:yaml.org,2002:python/object/apply:os.system'"),
    _bad("5000-digit-int", "model:\n  d_model: " + "9" * 5000 + "\n",
         "integer of 5000 digits at line 2; config integers have at most 100"),
    _bad("91-digit-int", "model:\n  d_model: 1" + "0" * 90 + "\n",
         "model.d_model=<integer of ~91 digits> is out of range; must be <= 131072"),
    _bad("1e300-as-int", "model:\n  d_model: 1.0e+300\n",
         "model.d_model=<integer of ~301 digits> is out of range"),
    _bad("nan", "optim:\n  lr: .nan\n", "optim.lr=nan must be a finite number"),
    _bad("bad-explicit-float", "optim:\n  lr: !!float abc\n",
         "is not valid YAML at line 2: cannot read !!float 'abc'"),
    _bad("bad-date", "checkpoint:\n  resume: 2024-13-45\n",
         "is not valid YAML at line 2: cannot read "),
    _bad("giant-string", "model:\n  norm: " + "x" * 100_000 + "\n", "model.norm='xxxxxxxx"),
    _bad("giant-list", "model:\n  norm: [" + "1, " * 3000 + "]\n",
         "model.norm=[1, 1, 1, 1, 1, 1, ...]"),
    _bad("giant-path", "checkpoint:\n  resume: " + "x" * 5000 + "\n",
         "checkpoint.resume='xxxxxxxx"),
    _bad("giant-field-name", "data:\n  source_field: " + "x" * 100_000 + "\n",
         "data.source_field='xxxxxxxx"),
    _bad("list-as-section", "model: [1, 2]\n",
         "model=[1, 2] has the wrong type; expected a mapping of arch, n_layers"),
    _bad("number-as-key", "1: 2\n", "unknown config key 1; valid keys: model, parallel"),
    _bad("dotted-key", "train:\n  model.steps: 5\n", "unknown config key train.model.steps"),
    _bad("async-twice", "checkpoint:\n  async: true\n  async_save: false\n",
         "checkpoint.async is given twice (as async and async_save)"),
    _bad("list-file", "- model\n", "must hold a mapping of sections, got list"),
    _bad("scalar-file", "0\n", "must hold a mapping of sections, got int"),
    _bad("over-1MiB", "#" * (1 << 20) + "\n", "is larger than 1 MiB"),
    _bad("not-utf8", b"model:\n  norm: \xff\n", "is not UTF-8 text (byte 0xff at offset 15)"),
])
def test_bad_config_files_are_one_line_errors(text, expected, tmp_path, capsys):
    """Issue 20: hostile or broken YAML is refused with one short line, before anything runs."""
    path = tmp_path / "c.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert expected in msg and "\n" not in msg and len(msg) < 400, msg[:1000]
    code = cli_train([f"logging.run_dir={tmp_path}/run"], str(path))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and expected in err
    assert not (tmp_path / "run").exists()


def test_int_too_large_for_a_float_field():
    """import-hf and the planner build configs from Python dicts, where ints are unbounded."""
    with pytest.raises(ConfigError) as e:
        config_from_dict({"optim": {"lr": 10 ** 400}})
    assert str(e.value) == "optim.lr=<integer of ~401 digits> must be a finite number"


def test_config_path_that_is_not_a_readable_file(tmp_path):
    with pytest.raises(ConfigError, match="is a directory; pass a YAML file"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="cannot be read: File name too long"):
        load_config(tmp_path / ("x" * 5000))
    with pytest.raises(ConfigError, match="is not a regular file"):
        load_config("/dev/null")


def _int_fields(cls=Config, prefix=""):
    """(path, field) of every field whose annotation holds an int, in every section."""
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _int_fields(tp, f"{prefix}{f.name}.")
        elif tp is int or int in typing.get_args(tp) or "list[int]" in str(tp):
            yield f"{prefix}{f.name}", f


def test_every_integer_field_has_an_upper_bound():
    """Integers size layers, buffers and loops: each needs a bound no real run reaches."""
    fields = dict(_int_fields())
    assert {"model.d_model", "parallel.pp_layers", "train.steps"} <= set(fields)
    assert not [path for path, f in fields.items() if f.metadata.get("hi") is None]


def test_a_missing_resume_checkpoint_names_those_its_folder_holds(tmp_path):
    for name in ("step_2", "step_10", "notes"):
        (tmp_path / name).mkdir()
    (tmp_path / "step_3").write_text("a file, not a checkpoint")
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"checkpoint.resume={tmp_path / 'step_7'}"])
    assert str(e.value).startswith("checkpoint.resume=")
    assert str(e.value).endswith("/step_7' is neither auto, none nor an existing checkpoint "
                                 "directory; its folder holds step_2, step_10")
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"checkpoint.resume={tmp_path / 'nope' / 'step_7'}"])
    assert str(e.value).endswith("nor an existing checkpoint directory")


def test_a_config_error_and_train_help_import_no_torch():
    """`llmtrain train` checks its config before importing torch (~4 s on two cores), and builds
    only the train parser: a typo is answered at once. `--help` at the top still lists every
    subcommand (it imports them all)."""
    script = ("import sys; from llmtrain.cli import main; "
              "assert main(['train', '--set', 'model.n_heads=3']) == 2; "
              "assert 'torch' not in sys.modules, 'torch imported'; "
              "main(['train', '--help'])")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr  # --help exits 0
    assert r.stderr.startswith("error: model.n_heads=3 does not divide")
    assert "--plan {auto}" in r.stdout
    r = subprocess.run([sys.executable, "-m", "llmtrain", "--help"], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0 and all(name in r.stdout for name in (
        "train", "preprocess", "scaling", "plan", "export", "import-hf", "generate", "bench",
        "ablate")), r.stdout
