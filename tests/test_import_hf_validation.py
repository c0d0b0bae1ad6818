"""`llmtrain import-hf` on damaged or hostile Hugging Face directories: every problem is a one-line
error (exit 2) found before the model is built or a weight is loaded, and --out stays untouched.
Also its memory: one weight at a time, never the whole model."""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from helpers import cli, init_run
from llmtrain.config import load_config
from llmtrain.train import checkpoint as ckpt
from llmtrain.train import export
from llmtrain.train.export import (SAFETENSORS_INDEX, hf_llama_shapes, load_checkpoint_model,
                                   to_hf_state_dict)

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Exports of one tiny Llama (GQA, untied output): fp32 in one file, fp32 sharded, and bf16
    sharded."""
    root = tmp_path_factory.mktemp("hf")
    init_run(root / "run", **{"model.n_kv_heads": 2, "model.tie_embeddings": False})
    dirs = {"single": [], "sharded": ["--max-shard-size", "100KB"],
            "bf16_sharded": ["--max-shard-size", "100KB", "--dtype", "bfloat16"]}
    for name, args in dirs.items():
        assert cli("export", str(root / "run"), "--out", str(root / name), *args) == 0
    return {"run": root / "run", **{name: root / name for name in dirs}}


@pytest.fixture
def no_loading(monkeypatch):
    """Building the model or loading a tensor is an error; `shards=False` also opening a shard."""
    def fail(what):
        def raise_(*args, **kwargs):
            raise AssertionError(f"{what} called before the checks")
        return raise_

    def install(shards: bool = True):
        import safetensors
        import safetensors.torch
        import llmtrain.model
        monkeypatch.setattr(llmtrain.model, "build_model", fail("build_model"))
        monkeypatch.setattr(safetensors.torch, "load_file", fail("load_file"))
        monkeypatch.setattr(export, "read_tensor", fail("read_tensor"))  # import-hf reads with it
        if not shards:
            monkeypatch.setattr(safetensors, "safe_open", fail("safe_open"))
    return install


def edit_config(**changes):
    def apply(src: Path) -> None:
        hf = json.loads((src / "config.json").read_text())
        for key, value in changes.items():
            if value is None:
                hf.pop(key)
            else:
                hf[key] = value
        (src / "config.json").write_text(json.dumps(hf))
    return apply


def write(name: str, text: str):
    return lambda src: (src / name).write_text(text)


def expect_refusal(src: Path, tmp_path: Path, capsys, *needles: str) -> str:
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli("import-hf", str(src), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert len(err) < 400, err  # values are shown truncated
    for needle in needles:
        assert needle in err, err
    assert sorted(os.listdir(tmp_path)) == ["hf"], "import-hf left something behind"
    return err


CONFIG_CASES = {
    "not_json": (write("config.json", '{"model_type": "llama",'), "is not valid JSON"),
    "deeply_nested": (write("config.json", "[" * 100_000), "is not valid JSON"),
    "too_many_digits": (write("config.json", '{"hidden_size": ' + "1" * 5000 + "}"),
                        "is not valid JSON"),
    "not_an_object": (write("config.json", "[1, 2, 3]"), "must hold a JSON object"),
    "too_big": (write("config.json", "{" + " " * (5 << 20) + "}"), "is larger than"),
    "missing_key": (edit_config(hidden_size=None), "hidden_size is missing"),
    "str": (edit_config(hidden_size="big"), "hidden_size='big' is not valid; expected an integer"),
    "list": (edit_config(hidden_size=[64]), "hidden_size=[64] is not valid"),
    "float": (edit_config(hidden_size=1e11), "hidden_size=100000000000.0 is not valid"),
    "int_as_float": (edit_config(hidden_size=64.0), "hidden_size=64.0 is not valid"),
    "bool": (edit_config(num_hidden_layers=True), "num_hidden_layers=True is not valid"),
    "huge_hidden": (edit_config(hidden_size=10 ** 11), "hidden_size=100000000000 is not valid"),
    "huge_layers_float": (edit_config(num_hidden_layers=1e6),
                          "num_hidden_layers=1000000.0 is not valid"),
    "huge_layers": (edit_config(num_hidden_layers=10 ** 6), "num_hidden_layers=1000000 is not"),
    "huge_vocab_float": (edit_config(vocab_size=1e14), "vocab_size=100000000000000.0 is not"),
    "huge_vocab": (edit_config(vocab_size=10 ** 14), "vocab_size=100000000000000 is not valid"),
    "zero_heads": (edit_config(num_attention_heads=0), "num_attention_heads=0 is not valid"),
    "negative_ffn": (edit_config(intermediate_size=-5), "intermediate_size=-5 is not valid"),
    "huge_context": (edit_config(max_position_embeddings=2 ** 40),
                     "max_position_embeddings=1099511627776 is not valid"),
    "act_list": (edit_config(hidden_act=["silu"]), "hidden_act=['silu'] is not valid"),
    "act_long": (edit_config(hidden_act="x" * 100_000), "hidden_act='xxxx"),
    "tie_str": (edit_config(tie_word_embeddings="no"), "tie_word_embeddings='no' is not valid"),
    "eps_str": (edit_config(rms_norm_eps="x"), "rms_norm_eps='x' is not valid"),
    "eps_zero": (edit_config(rms_norm_eps=0), "rms_norm_eps=0 is not valid"),
    "theta_inf": (edit_config(rope_parameters={"rope_type": "default", "rope_theta": float("inf")}),
                  "rope_theta=inf is not valid"),
    "rope_scaling_str": (edit_config(rope_scaling="linear"), "rope_scaling='linear' is not valid"),
    "rope_type_unknown": (edit_config(rope_parameters={"rope_type": "longrope"}),
                          "rope scaling 'longrope' is not supported"),
    "rope_factor_huge": (edit_config(rope_parameters={"rope_type": "dynamic", "factor": 1e30}),
                         "factor=1e+30 is not valid"),
    "window_zero": (edit_config(model_type="mistral", sliding_window=0),
                    "sliding_window=0 is not valid"),
    "heads_not_dividing": (edit_config(num_attention_heads=3, head_dim=None),
                           "n_heads=3 does not divide"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_json_is_refused_before_any_shard_is_read(case, hf_dirs, tmp_path, capsys,
                                                             no_loading):
    mutate, needle = CONFIG_CASES[case]
    src = tmp_path / "hf"
    shutil.copytree(hf_dirs["single"], src)
    mutate(src)
    no_loading(shards=False)
    err = expect_refusal(src, tmp_path, capsys, needle)
    assert "config.json" in err or "model." in err, err


def drop_shard(src: Path) -> None:
    (src / "model-00002-of-00006.safetensors").unlink()


def halve(name: str):
    def apply(src: Path) -> None:
        data = (src / name).read_bytes()
        (src / name).write_bytes(data[:len(data) // 2])
    return apply


def redirect_index(target: str):
    def apply(src: Path) -> None:
        index = json.loads((src / SAFETENSORS_INDEX).read_text())
        first = next(iter(index["weight_map"]))
        index["weight_map"][first] = target
        (src / SAFETENSORS_INDEX).write_text(json.dumps(index))
    return apply


SHARD_CASES = {
    "truncated_single": ("single", halve("model.safetensors"),
                         ["model.safetensors is not a valid safetensors file"]),
    "truncated_shard": ("sharded", halve("model-00003-of-00006.safetensors"),
                        ["model-00003-of-00006.safetensors is not a valid safetensors file"]),
    "missing_shard": ("sharded", drop_shard,
                      ["names shard 'model-00002-of-00006.safetensors'", "not a file"]),
    "index_escapes": ("sharded", redirect_index("../single/model.safetensors"),
                      ["names shard '../single/model.safetensors'"]),
    "index_wrong_file": ("sharded", redirect_index("model-00006-of-00006.safetensors"),
                         ["which does not hold it"]),
    "index_not_json": ("sharded", write(SAFETENSORS_INDEX, "nope"), ["is not valid JSON"]),
    "index_no_map": ("sharded", write(SAFETENSORS_INDEX, '{"weight_map": [1]}'),
                     ["weight_map"]),
    "wider_ffn": ("single", edit_config(intermediate_size=200),
                  ["model.layers.0.mlp.gate_proj.weight is [176, 64], config.json implies "
                   "[200, 64]"]),
    "more_layers": ("single", edit_config(num_hidden_layers=3),
                    ["missing model.layers.2."]),
    "bigger_vocab": ("single", edit_config(vocab_size=2048),
                     ["model.embed_tokens.weight is [1024, 64], config.json implies [2048, 64]"]),
    "tied_but_lm_head": ("single", edit_config(tie_word_embeddings=True, num_hidden_layers=1),
                         ["unexpected model.layers.1."]),
    "no_weights": ("single", lambda src: (src / "model.safetensors").unlink(),
                   ["holds neither model.safetensors nor"]),
}


@pytest.mark.parametrize("case", list(SHARD_CASES))
def test_bad_shards_are_refused_before_the_model_is_built(case, hf_dirs, tmp_path, capsys,
                                                          no_loading):
    base, mutate, needles = SHARD_CASES[case]
    src = tmp_path / "hf"
    shutil.copytree(hf_dirs[base], src)
    assert base == "single" or (src / "model-00006-of-00006.safetensors").is_file()
    mutate(src)
    no_loading()
    expect_refusal(src, tmp_path, capsys, *needles)


def test_model_safetensors_wins_over_an_index_as_in_transformers(hf_dirs, tmp_path):
    """transformers loads model.safetensors when both it and an index are there (a stale index
    of an older export, say): import-hf reads the same weights."""
    from transformers import AutoModelForCausalLM
    src, out = tmp_path / "hf", tmp_path / "out"
    shutil.copytree(hf_dirs["single"], src)
    for f in hf_dirs["bf16_sharded"].glob("model*"):
        if f.name != "model.safetensors":
            shutil.copy(f, src / f.name)
    assert cli("import-hf", str(src), "--out", str(out)) == 0
    cfg = load_config(out / "config.yaml")
    ours = load_checkpoint_model(out / "checkpoints" / "step_0", cfg)
    theirs = AutoModelForCausalLM.from_pretrained(src, local_files_only=True).eval()
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 16),
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens).logits, rtol=0, atol=1e-5)


def test_import_into_used_out_needs_overwrite(hf_dirs, tmp_path, capsys):
    src, out = hf_dirs["single"], tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli("import-hf", str(src), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(out) in err and "--overwrite" in err, err
    assert sorted(os.listdir(out)) == ["notes.txt"]

    assert cli("import-hf", str(src), "--out", str(out), "--overwrite") == 0
    # a later checkpoint of the run trained on from the first import must not outlive it
    shutil.copytree(out / "checkpoints" / "step_0", out / "checkpoints" / "step_7")
    assert cli("import-hf", str(src), "--out", str(out)) == 2
    assert cli("import-hf", str(src), "--out", str(out), "--overwrite") == 0
    assert sorted(os.listdir(out)) == [".lock", "checkpoints", "config.yaml", "notes.txt",
                                       "tokenizer.json"]
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step_0"]
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary sibling left

    # a job training in `out` holds its lock: --overwrite must not replace its checkpoints
    from llmtrain.train.rundir import RunDirLock
    with RunDirLock(out):
        assert cli("import-hf", str(src), "--out", str(out), "--overwrite") == 2
    assert "is in use by another llmtrain job" in capsys.readouterr().err
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step_0"]


def test_failed_import_leaves_nothing_behind(hf_dirs, tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ckpt, "save_model", disk_full)
    with pytest.raises(OSError, match="No space left"):
        cli("import-hf", str(hf_dirs["single"]), "--out", str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("model", [
    {},
    {"n_kv_heads": 1, "tie_embeddings": False, "bias": True, "activation": "geglu", "d_ff": 96},
])
def test_expected_shapes_are_what_export_writes(model):
    """The shapes import-hf demands are those of the tensors export writes for the same model."""
    from llmtrain.config import ModelConfig
    from llmtrain.model import build_model
    m = ModelConfig(n_layers=3, d_model=64, n_heads=4, vocab_size=300, max_seq_len=32, **model)
    written = to_hf_state_dict(build_model(m, "meta"), "llama")
    assert hf_llama_shapes(m) == {k: tuple(v.shape) for k, v in written.items()}


# ----------------------------------------------------------------------------------------------
# Memory: one tensor at a time, never the model


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the CPU tensor storages that ops run under the mode allocated and that are still
    alive (a storage counted once, however many views share it), and their peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.storages: set[int] = set()

    def _freed(self, key: int, nbytes: int) -> None:
        self.storages.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()  # the same Python object while it lives
                if id(storage) not in self.storages:
                    self.storages.add(id(storage))
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._freed, id(storage), storage.nbytes())
        return out


def open_files_under(d: Path) -> list[str]:
    """Files under `d` this process has open or mapped."""
    links = []
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            links.append(os.readlink(fd))
    maps = [line.split(maxsplit=5)[-1] for line in
            Path("/proc/self/maps").read_text().splitlines() if line.count(" ") >= 5]
    return [f for f in links + maps if f.startswith(str(d.resolve()))]


def test_import_holds_one_tensor_at_a_time_and_writes_todays_checkpoint(hf_dirs, tmp_path):
    """A sharded bf16 directory: the tensors alive at once never exceed the largest weight read
    as bf16 and converted to fp32 (the model is over three times that); the checkpoint is the
    one today's build-load-save import wrote, byte for byte; no shard is left open."""
    from llmtrain.model import build_model
    src, out = hf_dirs["bf16_sharded"], tmp_path / "out"
    with LiveTensorBytes() as tracker:
        assert cli("import-hf", str(src), "--out", str(out)) == 0
    cfg = load_config(out / "config.yaml")
    sizes = [math.prod(s) * 4 for s in hf_llama_shapes(cfg.model).values()]  # fp32 bytes
    assert sum(sizes) > 3 * max(sizes)
    assert tracker.peak <= 1.5 * max(sizes), (tracker.peak, max(sizes), sum(sizes))
    assert open_files_under(src) == []

    model = build_model(cfg.model)
    model.load_state_dict(export.from_hf_llama_state_dict(export.read_safetensors(src),
                                                          cfg.model))
    ref = ckpt.save_model(tmp_path / "ref", 0, model, cfg)
    new = out / "checkpoints" / "step_0"
    assert sorted(os.listdir(new)) == sorted(os.listdir(ref)) == [
        ".metadata", "__0_0.distcp", "manifest.json", "meta.json"]
    assert (new / "__0_0.distcp").read_bytes() == (ref / "__0_0.distcp").read_bytes()
    a, b = (pickle.loads((d / ".metadata").read_bytes()) for d in (new, ref))  # our own files
    for field in ("state_dict_metadata", "storage_data", "planner_data"):
        assert getattr(a, field) == getattr(b, field), field
    a, b = (json.loads((d / "meta.json").read_text()) for d in (new, ref))
    assert a.pop("source") == str(src.resolve()) and a.pop("time") and b.pop("time")
    assert a == b


def test_a_shard_truncated_after_the_checks_is_refused_with_nothing_left_open(
        hf_dirs, tmp_path, capsys, monkeypatch):
    """A shard that shrinks between the header checks and the reads (another process writing
    it): a one-line error, no shard left open, --out untouched."""
    src = tmp_path / "hf"
    shutil.copytree(hf_dirs["sharded"], src)
    check = export.check_llama_weights

    def check_then_truncate(*args):
        check(*args)
        halve("model-00006-of-00006.safetensors")(src)
    monkeypatch.setattr(export, "check_llama_weights", check_then_truncate)
    expect_refusal(src, tmp_path, capsys, "model-00006-of-00006.safetensors is not a valid "
                                          "safetensors file", "data_offsets=")
    assert open_files_under(src) == []
