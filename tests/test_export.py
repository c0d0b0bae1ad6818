"""Export to / import from Hugging Face, checked against `transformers` itself (offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import cli, cli_train, init_run, tiny_overrides
from llmtrain.config import load_config, save_config
from llmtrain.train import checkpoint as ckpt
from llmtrain.train.export import (load_checkpoint_model, read_safetensors, resolve_checkpoint,
                                   run_tokenizer, write_safetensors)

transformers = pytest.importorskip("transformers")

LAYOUTS = {
    # Llama with grouped-query attention and an untied output layer
    "llama": {"model.n_kv_heads": 2, "model.tie_embeddings": False},
    "gpt2": {"model.norm": "layernorm", "model.position": "learned", "model.activation": "gelu",
             "model.bias": True, "model.tie_embeddings": True},
}
TEXT = "def f(x):\n    return x + 1  # héllo wörld<|endoftext|>\tclass A: pass"


def train_run(run: Path, **extra) -> Path:
    """A tiny model trained 2 steps through the CLI; returns the run dir."""
    assert cli_train(tiny_overrides(run, **{"train.steps": 2, **extra})) == 0
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    return {name: train_run(root / name, **extra) for name, extra in LAYOUTS.items()}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_export_matches_transformers(runs, layout, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
    out = tmp_path / "hf"
    assert cli("export", str(runs[layout]), "--format", "hf", "--out", str(out)) == 0
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["architectures"] == [{"llama": "LlamaForCausalLM",
                                       "gpt2": "GPT2LMHeadModel"}[layout]]

    path, cfg, run_dir = resolve_checkpoint(runs[layout])
    assert path.name == "step_2"
    ours = load_checkpoint_model(path, cfg)
    theirs = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert theirs.dtype == torch.float32
    if layout == "llama":
        assert theirs.config.num_key_value_heads == 2 < theirs.config.num_attention_heads
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 24),
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), rtol=0, atol=1e-4)

    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert isinstance(tok, PreTrainedTokenizerFast)
    ids = run_tokenizer(cfg, run_dir).encode(TEXT)
    assert tok(TEXT)["input_ids"] == ids
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert tok.decode(ids) == TEXT


def test_import_round_trips_bit_exactly(runs, tmp_path):
    hf_dir, imported = tmp_path / "hf", tmp_path / "imported"
    assert cli("export", str(runs["llama"]), "--out", str(hf_dir)) == 0
    assert cli("import-hf", str(hf_dir), "--out", str(imported)) == 0

    orig_cfg = load_config(runs["llama"] / "config.yaml")
    new_cfg = load_config(imported / "config.yaml")
    assert ckpt.arch_hash(new_cfg) == ckpt.arch_hash(orig_cfg)
    meta = ckpt.read_meta(imported / "checkpoints" / "step_0")
    assert meta["model_only"] and meta["step"] == 0
    a = load_checkpoint_model(runs["llama"] / "checkpoints" / "step_2", orig_cfg).state_dict()
    b = load_checkpoint_model(imported / "checkpoints" / "step_0", new_cfg).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (imported / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()


def test_sharded_safetensors_round_trip(tmp_path):
    tensors = {f"w{i}": torch.randn(64, 64) for i in range(5)}
    names = write_safetensors(tensors, tmp_path, max_shard_bytes=2 * 64 * 64 * 4)
    assert names == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 64 * 64 * 4
    assert set(index["weight_map"]) == set(tensors)
    back = read_safetensors(tmp_path)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("model", [
    {"norm_position": "post"},
    {"norm_position": "deepnorm"},
    {"norm_position": "b2t"},
    {"norm": "layernorm"},  # layernorm with rope + swiglu
    {"position": "learned"},  # learned positions with rmsnorm + swiglu
    {"activation": "gelu"},  # gelu with rope
    {"norm": "layernorm", "position": "learned", "activation": "gelu", "bias": True,
     "n_kv_heads": 2},  # GPT-2 layout with GQA
    # variants without parameters of their own: the weight mapping alone would export them
    {"ln_scaling": "inv_sqrt_depth"},
    {"value_residual": True},
    {"logit_softcap": 30.0},
])
def test_refused_layouts(model, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config(None, tiny_overrides(run, **{f"model.{k}": v for k, v in model.items()}))
    save_config(cfg, run / "config.yaml")
    assert cli("export", str(run), "--out", str(tmp_path / "hf")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: this model cannot be exported") and err.count("\n") == 1, err
    assert not (tmp_path / "hf").exists()


def test_import_refuses_unsupported_config(tmp_path, capsys):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    assert cli("import-hf", str(src), "--out", str(tmp_path / "out")) == 2
    assert "model_type llama or mistral" in capsys.readouterr().err


def test_training_continues_from_import(runs, tmp_path, capsys):
    """import-hf -> edit the data section of config.yaml -> `llmtrain train` starts from the
    imported weights with a fresh optimizer."""
    import yaml
    hf_dir, run = tmp_path / "hf", tmp_path / "imported"
    assert cli("export", str(runs["llama"]), "--out", str(hf_dir)) == 0
    assert cli("import-hf", str(hf_dir), "--out", str(run)) == 0
    corpus = tmp_path / "corpus.jsonl"  # one document per line, enough for both splits
    text = Path(json.__file__).read_text()
    corpus.write_text("".join(json.dumps({"text": text[i:i + 2000]}) + "\n"
                              for i in range(0, len(text), 200)))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"].update(source="files", paths=[str(corpus)])
    cfg["train"].update(steps=2, global_batch_size=4, micro_batch_size=4, seq_len=32,
                        eval_steps=1)
    cfg["logging"].update(tensorboard=False, progress=False)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    capsys.readouterr()
    assert cli("train", str(run / "config.yaml")) == 0
    assert f"resumed from {run / 'checkpoints' / 'step_0'} at step 0" in capsys.readouterr().out
    assert ckpt.read_meta(run / "checkpoints" / "step_2")["step"] == 2


@pytest.mark.parametrize("model", [
    # GPT-2 with an untied output layer
    {"norm": "layernorm", "position": "learned", "activation": "gelu", "bias": True,
     "tie_embeddings": False},
    # Llama with tied embeddings, GEGLU (hidden_act=gelu), biases and multi-query attention
    {"activation": "geglu", "bias": True, "n_kv_heads": 1, "tie_embeddings": True},
])
def test_more_layouts_sharded_match_transformers(model, tmp_path):
    """Initialised (not trained) weights, written as a model-only checkpoint; safetensors split
    into several shards; Llama ones round-trip through import-hf."""
    from transformers import AutoModelForCausalLM
    run, hf_dir = tmp_path / "run", tmp_path / "hf"
    cfg, ours = init_run(run, **{f"model.{k}": v for k, v in model.items()})
    assert cli("export", str(run), "--out", str(hf_dir), "--max-shard-size", "200KB") == 0
    assert (hf_dir / "model.safetensors.index.json").is_file()
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens), rtol=0, atol=1e-4)
    if cfg.model.position == "rope":
        assert cli("import-hf", str(hf_dir), "--out", str(tmp_path / "imported")) == 0
        back = load_checkpoint_model(tmp_path / "imported" / "checkpoints" / "step_0", cfg)
        for k, v in ours.state_dict().items():
            assert torch.equal(back.state_dict()[k], v), k


# ----------------------------------------------------------------------------------------------
# --out that is not empty; run directories for export and generate


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file()}


def test_export_into_used_dir_needs_overwrite_and_drops_stale_shards(runs, tmp_path, capsys):
    """A sharded bf16 export, then an fp32 single-file one into the same dir: refused without
    --overwrite (nothing touched); with it no old shard or index is left beside the new file,
    a file of the user's stays, and import-hf reads exactly the new weights."""
    out, imported = tmp_path / "hf", tmp_path / "imported"
    assert cli("export", str(runs["llama"]), "--out", str(out), "--dtype", "bfloat16",
               "--max-shard-size", "100KB") == 0
    (out / "README.md").write_text("my notes")
    before = snapshot(out)
    capsys.readouterr()
    assert cli("export", str(runs["llama"]), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(out) in err and "--overwrite" in err, err
    assert snapshot(out) == before

    assert cli("export", str(runs["llama"]), "--out", str(out), "--overwrite") == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors",
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert (out / "README.md").read_text() == "my notes"
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary sibling left
    assert cli("import-hf", str(out), "--out", str(imported)) == 0
    path, cfg, _ = resolve_checkpoint(runs["llama"])
    a = load_checkpoint_model(path, cfg).state_dict()
    b = load_checkpoint_model(imported / "checkpoints" / "step_0", cfg).state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_export_and_generate_read_a_multi_gpu_run(tmp_path, capsys):
    """The saved parallel layout (tp=2) describes the training job, not this process."""
    run = tmp_path / "run"
    init_run(run, world_size=2, **{"parallel.tp": 2})
    assert cli("export", str(run), "--out", str(tmp_path / "hf")) == 0, capsys.readouterr().err
    assert cli("generate", str(run), "--prompt", "def", "--max-new-tokens", "2") == 0, \
        capsys.readouterr().err


def test_generate_takes_a_run_dir_as_its_newest_checkpoint(runs, capsys):
    step = runs["llama"] / "checkpoints" / "step_2"
    capsys.readouterr()
    assert cli("generate", str(step), "--prompt", "def f(", "--max-new-tokens", "5") == 0
    want = capsys.readouterr().out
    assert cli("generate", str(runs["llama"]), "--prompt", "def f(", "--max-new-tokens", "5") == 0
    assert capsys.readouterr().out == want


@pytest.mark.parametrize("command", ["generate", "export"])
@pytest.mark.parametrize("case", ["missing", "file", "empty_dir", "run_without_checkpoints"])
def test_checkpoint_path_errors_are_one_line(command, case, tmp_path, capsys):
    path = tmp_path / "x"
    if case == "file":
        path.write_text("not a checkpoint")
    elif case == "empty_dir":
        path.mkdir()
    elif case == "run_without_checkpoints":
        path.mkdir()
        save_config(load_config(None, tiny_overrides(path)), path / "config.yaml")
    args = ["--prompt", "x"] if command == "generate" else ["--out", str(tmp_path / "hf")]
    assert cli(command, str(path), *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    if case == "run_without_checkpoints":
        assert f"run {path} has no checkpoint" in err, err
    else:
        assert f"{str(path)!r} is neither a checkpoint nor a run directory" in err, err
    assert not (tmp_path / "hf").exists()


def test_run_dir_means_its_newest_good_checkpoint(tmp_path, capsys):
    """generate and export of a run dir skip a damaged newest checkpoint, as resuming does."""
    run = tmp_path / "run"
    cfg, model = init_run(run)
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(-1)
    damaged = ckpt.save_model(ckpt.checkpoint_dir(cfg), 2, model, cfg)
    shard = next(damaged.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-8])
    assert resolve_checkpoint(run)[0].name == "step_1"
    outputs = []
    for path in (run / "checkpoints" / "step_1", run):
        assert cli("generate", str(path), "--prompt", "def f(", "--max-new-tokens", "5") == 0
        outputs.append(capsys.readouterr())
    assert outputs[1].out == outputs[0].out
    assert f"skipping damaged checkpoint {damaged}" in outputs[1].err
