"""Hugging Face interoperability: `llmtrain export` (checkpoint -> HF directory) and
`llmtrain import-hf` (HF Llama directory -> run directory with a model-only checkpoint).

Two HF architectures can express our decoder exactly:
  llama  rmsnorm, pre-LN, rope, swiglu (or geglu: hidden_act=gelu), MHA/GQA/MQA -> LlamaForCausalLM.
         Our rope pairs (i, i + head_dim/2) as HF's rotate_half does, so q/k need no permutation.
  gpt2   layernorm, pre-LN, learned positions, gelu, biases, MHA                 -> GPT2LMHeadModel.
         GPT-2 stores projections as Conv1D ([in, out], the transpose of nn.Linear), fuses q, k, v
         into c_attn = [q; k; v], and defaults to the tanh GELU, so we write
         activation_function=gelu (exact, as ours).
Weights go to safetensors (never pickle), sharded above 5 GB with HF's index file; tied output
weights are stored once (HF drops lm_head.weight when tie_word_embeddings is true).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path

import torch

from llmtrain.config import Config, ConfigError, ModelConfig, config_from_dict, load_config, \
    save_config, validate
from llmtrain.train import checkpoint as ckpt

SAFETENSORS_INDEX = "model.safetensors.index.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# (our parameter, HF parameter) without the .weight/.bias suffix; {i} is the layer index.
_LLAMA_NAMES = [
    ("tok_embeddings", "model.embed_tokens"),
    ("layers.{i}.attention.wq", "model.layers.{i}.self_attn.q_proj"),
    ("layers.{i}.attention.wk", "model.layers.{i}.self_attn.k_proj"),
    ("layers.{i}.attention.wv", "model.layers.{i}.self_attn.v_proj"),
    ("layers.{i}.attention.wo", "model.layers.{i}.self_attn.o_proj"),
    ("layers.{i}.feed_forward.w1", "model.layers.{i}.mlp.gate_proj"),
    ("layers.{i}.feed_forward.w3", "model.layers.{i}.mlp.up_proj"),
    ("layers.{i}.feed_forward.w2", "model.layers.{i}.mlp.down_proj"),
    ("layers.{i}.attention_norm", "model.layers.{i}.input_layernorm"),
    ("layers.{i}.ffn_norm", "model.layers.{i}.post_attention_layernorm"),
    ("norm", "model.norm"),
    ("output", "lm_head"),
]
# wq/wk/wv are fused into c_attn separately; these are transposed when in _GPT2_CONV1D.
_GPT2_NAMES = [
    ("tok_embeddings", "transformer.wte"),
    ("pos_embeddings", "transformer.wpe"),
    ("layers.{i}.attention.wo", "transformer.h.{i}.attn.c_proj"),
    ("layers.{i}.feed_forward.w1", "transformer.h.{i}.mlp.c_fc"),
    ("layers.{i}.feed_forward.w2", "transformer.h.{i}.mlp.c_proj"),
    ("layers.{i}.attention_norm", "transformer.h.{i}.ln_1"),
    ("layers.{i}.ffn_norm", "transformer.h.{i}.ln_2"),
    ("norm", "transformer.ln_f"),
    ("output", "lm_head"),
]
_GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# What each HF architecture needs of model.*: key -> allowed values.
_NEEDS = {
    "llama": {"arch": ("decoder",), "norm": ("rmsnorm",), "norm_position": ("pre",),
              "position": ("rope",), "activation": ("swiglu", "geglu")},
    "gpt2": {"arch": ("decoder",), "norm": ("layernorm",), "norm_position": ("pre",),
             "position": ("learned",), "activation": ("gelu",), "bias": (True,)},
}
_LLAMA_ACT = {"swiglu": "silu", "geglu": "gelu"}  # HF ACT2FN["gelu"] is the exact GELU


def _rename(name: str, table: list[tuple[str, str]], to_hf: bool = True) -> str | None:
    for ours, hf in table:
        src, dst = (ours, hf) if to_hf else (hf, ours)
        pattern = re.escape(src).replace(re.escape("{i}"), r"(?P<i>\d+)")
        m = re.fullmatch(pattern + r"\.(?P<p>weight|bias)", name)
        if m:
            return dst.format(i=m.groupdict().get("i")) + "." + m["p"]
    return None


def hf_architecture(m: ModelConfig) -> str:
    """`llama` or `gpt2`, whichever expresses model config `m` exactly; else a ConfigError."""
    why = {}
    for arch, needs in _NEEDS.items():
        bad = [f"{k}={getattr(m, k)}" for k, ok in needs.items() if getattr(m, k) not in ok]
        if arch == "gpt2" and m.kv_heads != m.n_heads:
            bad.append(f"n_kv_heads={m.kv_heads} (GPT-2 has no grouped-query attention)")
        if getattr(m, "moe", None) is not None and m.moe.num_experts:
            bad.append(f"moe.num_experts={m.moe.num_experts}")
        if not bad:
            return arch
        why[arch] = ", ".join(bad)
    raise ConfigError(
        "this model cannot be exported to Hugging Face: Llama needs rmsnorm, pre-LN, rope and "
        f"swiglu/geglu (model has {why['llama']}); GPT-2 needs layernorm, pre-LN, learned "
        f"positions, gelu and bias=true (model has {why['gpt2']})")


# ----------------------------------------------------------------------------------------------
# Our state dict <-> HF state dict


def to_hf_state_dict(model: torch.nn.Module, arch: str) -> dict[str, torch.Tensor]:
    m: ModelConfig = model.cfg
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if m.tie_embeddings:
        sd.pop("output.weight")  # stored once, as the embedding
    out = {}
    if arch == "gpt2":
        for i in range(m.n_layers):
            for p in ("weight", "bias"):
                qkv = [sd.pop(f"layers.{i}.attention.{w}.{p}") for w in ("wq", "wk", "wv")]
                out[f"transformer.h.{i}.attn.c_attn.{p}"] = torch.cat(qkv)
    table = _LLAMA_NAMES if arch == "llama" else _GPT2_NAMES
    for name, t in sd.items():
        hf = _rename(name, table)
        if hf is None:
            raise ConfigError(f"parameter {name} has no {arch} counterpart")
        out[hf] = t
    if arch == "gpt2":
        out = {k: v.t() if k.endswith(_GPT2_CONV1D) else v for k, v in out.items()}
    return out


def from_hf_llama_state_dict(sd: dict[str, torch.Tensor], m: ModelConfig) -> dict:
    out = {}
    for name, t in sd.items():
        if name.endswith("rotary_emb.inv_freq"):  # a buffer some old exports carry
            continue
        ours = _rename(name, _LLAMA_NAMES, to_hf=False)
        if ours is None:
            raise ConfigError(f"weight {name} of the Hugging Face checkpoint has no llmtrain "
                              f"counterpart")
        out[ours] = t
    if m.tie_embeddings:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


# ----------------------------------------------------------------------------------------------
# HF config.json and tokenizer files


def _hf_config(m: ModelConfig, arch: str, dtype: str, special: dict) -> dict:
    if arch == "llama":
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "vocab_size": m.vocab_size, "hidden_size": m.d_model,
                "intermediate_size": m.ffn_dim, "num_hidden_layers": m.n_layers,
                "num_attention_heads": m.n_heads, "num_key_value_heads": m.kv_heads,
                "head_dim": m.head_dim, "hidden_act": _LLAMA_ACT[m.activation],
                "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps,
                "rope_theta": m.rope_theta, "rope_scaling": None,
                "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
                "attention_bias": m.bias, "mlp_bias": m.bias, "attention_dropout": m.dropout,
                "tie_word_embeddings": m.tie_embeddings, "initializer_range": m.init_std,
                "torch_dtype": dtype, "use_cache": True, **special}
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": m.vocab_size, "n_positions": m.max_seq_len, "n_embd": m.d_model,
            "n_layer": m.n_layers, "n_head": m.n_heads, "n_inner": m.ffn_dim,
            "activation_function": "gelu", "layer_norm_epsilon": m.norm_eps,
            "resid_pdrop": m.dropout, "embd_pdrop": m.dropout, "attn_pdrop": m.dropout,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "tie_word_embeddings": m.tie_embeddings,
            "initializer_range": m.init_std, "torch_dtype": dtype, "use_cache": True, **special}


def write_tokenizer(tok, out: Path, max_len: int) -> dict:
    """tokenizer.json + tokenizer_config.json (+ special_tokens_map.json) for AutoTokenizer;
    returns the bos/eos/pad ids for config.json. Our corpora have one EOD token between
    documents and no BOS, so bos = eos = EOD, as GPT-2 does."""
    tok.save(out / "tokenizer.json")
    eos = tok.hf.id_to_token(tok.eod)
    pad = tok.hf.id_to_token(tok.pad) if tok.pad >= 0 else None
    special = {"bos_token": eos, "eos_token": eos, "pad_token": pad}
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", **special, "unk_token": None,
         "add_bos_token": False, "add_eos_token": False, "model_max_length": max_len,
         "clean_up_tokenization_spaces": False}, indent=1))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {k: v for k, v in special.items() if v is not None}, indent=1))
    return {"bos_token_id": tok.eod, "eos_token_id": tok.eod,
            "pad_token_id": tok.pad if tok.pad >= 0 else None}


# ----------------------------------------------------------------------------------------------
# safetensors, sharded as HF does


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?\s*", text.upper())
    if not m:
        raise ConfigError(f"--max-shard-size={text!r} is not a size; use e.g. 5GB or 500MB")
    return int(float(m[1]) * 1000 ** " KMGT".index(m[2] or " "))


def write_safetensors(tensors: dict[str, torch.Tensor], out: Path,
                      max_shard_bytes: int = 5 * 1000 ** 3) -> list[str]:
    """model.safetensors, or model-0000k-of-0000N.safetensors + model.safetensors.index.json when
    the weights exceed `max_shard_bytes` (HF's default 5 GB). Returns the file names."""
    from safetensors.torch import save_file
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous().clone()  # safetensors refuses shared storage
        size += nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {n: f for f, s in zip(names, shards) for n in s}}
        (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=1))
    umask = os.umask(0)
    os.umask(umask)
    for fname, shard in zip(names, shards):
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        os.chmod(out / fname, 0o666 & ~umask)  # safetensors creates its files 0600
    return names


def read_safetensors(src: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    index = src / SAFETENSORS_INDEX
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (src / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ConfigError(f"{src} holds neither model.safetensors nor {SAFETENSORS_INDEX} "
                          f"(pickled pytorch_model.bin is not read: convert it to safetensors)")
    sd = {}
    for f in files:
        sd.update(load_file(str(src / f)))
    return sd


# ----------------------------------------------------------------------------------------------
# export


def resolve_checkpoint(path: str | Path, config: str | Path | None = None
                       ) -> tuple[Path, Config, Path]:
    """(checkpoint dir, run config, dir of that config) for a checkpoint dir
    `<run>/checkpoints/step_N` or a run dir (its newest intact checkpoint). The config is
    `config`, else the run's config.yaml. Refuses a layout HF cannot express before any weight
    is read."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"checkpoint {str(path)!r} does not exist")
    is_ckpt = (p / "meta.json").is_file()
    if config is None:
        candidates = [p.parent.parent / "config.yaml", p.parent / "config.yaml"] if is_ckpt \
            else [p / "config.yaml"]
        config = next((c for c in candidates if c.is_file()), None)
        if config is None:
            raise ConfigError(f"no config.yaml found for {p} (looked at "
                              f"{', '.join(map(str, candidates))}); pass --config")
    cfg = load_config(config)
    hf_architecture(cfg.model)  # refuse before reading any weights
    if not is_ckpt:
        root = ckpt.checkpoint_dir(cfg) if cfg.checkpoint.dir else p / "checkpoints"
        p = ckpt.latest_intact(root)
        if p is None:
            raise ConfigError(f"run {path} has no checkpoint under {root}")
    return p, cfg, Path(config).parent


def run_tokenizer(cfg: Config, run_dir: Path | None = None):
    """The tokenizer a run trained with: <run_dir>/tokenizer.json, data.tokenizer, or the corpus
    cache (built again if missing)."""
    from llmtrain.data.tokenizer import Tokenizer
    if run_dir is not None and (run_dir / "tokenizer.json").is_file():
        return Tokenizer.load(run_dir / "tokenizer.json")
    if cfg.data.tokenizer:
        return Tokenizer.load(cfg.data.tokenizer)
    from llmtrain.data.preprocess import prepare_corpus
    return prepare_corpus(cfg)[1]


def load_checkpoint_model(path: Path, cfg: Config) -> torch.nn.Module:
    """Our model in fp32 on the CPU with the weights of checkpoint `path` (verified first)."""
    from llmtrain.model import build_model
    model = build_model(cfg.model, "cpu")
    ckpt.load_model(path, model)
    return model.eval()


def export_hf(checkpoint: str | Path, out: str | Path, dtype: str = "float32",
              max_shard_bytes: int = 5 * 1000 ** 3, config: str | Path | None = None,
              log=print) -> Path:
    """Write checkpoint (dir or run dir) as a HF model directory `out`; returns `out`."""
    path, cfg, run_dir = resolve_checkpoint(checkpoint, config)
    arch = hf_architecture(cfg.model)
    if dtype not in _DTYPES:
        raise ConfigError(f"--dtype={dtype!r} is not valid; use one of {', '.join(_DTYPES)}")
    model = load_checkpoint_model(path, cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    special = write_tokenizer(run_tokenizer(cfg, run_dir), out, cfg.model.max_seq_len)
    hf_cfg = _hf_config(cfg.model, arch, dtype, special)
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=1))
    (out / "generation_config.json").write_text(json.dumps(
        {k: special[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}, indent=1))
    tensors = {k: v.to(_DTYPES[dtype]) for k, v in to_hf_state_dict(model, arch).items()}
    files = write_safetensors(tensors, out, max_shard_bytes)
    log(f"exported {path} as {hf_cfg['architectures'][0]} ({dtype}, {len(files)} safetensors "
        f"file{'s' if len(files) > 1 else ''}) to {out}")
    return out


# ----------------------------------------------------------------------------------------------
# import-hf


def _rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ConfigError(f"rope scaling {kind!r} of the Hugging Face config is not supported; "
                          f"only plain rope (rope_type default)")
    return float(params.get("rope_theta") or hf.get("rope_theta") or 10000.0)


def model_config_from_hf(hf: dict) -> dict:
    """model.* settings for a HF Llama config.json; ConfigError for anything we cannot express."""
    if hf.get("model_type") != "llama":
        raise ConfigError(f"import-hf reads Llama checkpoints (model_type llama); this one is "
                          f"{hf.get('model_type')!r}")
    act = {v: k for k, v in _LLAMA_ACT.items()}.get(hf.get("hidden_act", "silu"))
    if act is None:
        raise ConfigError(f"hidden_act={hf.get('hidden_act')!r} is not supported; use silu "
                          f"(swiglu) or gelu (geglu)")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, d // heads):
        raise ConfigError(f"head_dim={hf['head_dim']} != hidden_size / num_attention_heads="
                          f"{d // heads} is not supported")
    bias = bool(hf.get("attention_bias", False))
    if bool(hf.get("mlp_bias", False)) != bias:
        raise ConfigError(f"attention_bias={bias} with mlp_bias={hf.get('mlp_bias')} is not "
                          f"supported; llmtrain has one model.bias for both")
    return {"arch": "decoder", "n_layers": hf["num_hidden_layers"], "d_model": d,
            "n_heads": heads, "n_kv_heads": hf.get("num_key_value_heads") or heads,
            "d_ff": hf["intermediate_size"], "vocab_size": hf["vocab_size"],
            "max_seq_len": hf.get("max_position_embeddings", 2048), "norm": "rmsnorm",
            "norm_eps": hf.get("rms_norm_eps", 1e-6), "norm_position": "pre", "position": "rope",
            "rope_theta": _rope_theta(hf), "activation": act, "bias": bias,
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "dropout": float(hf.get("attention_dropout", 0.0)),
            "init_std": float(hf.get("initializer_range", 0.02))}


def import_hf(src: str | Path, out: str | Path, log=print) -> Path:
    """HF Llama directory `src` -> run directory `out`: config.yaml, tokenizer.json and a
    model-only checkpoint `checkpoints/step_0`. `llmtrain train out/config.yaml` continues."""
    from llmtrain.data.tokenizer import Tokenizer
    from llmtrain.model import build_model
    src, out = Path(src), Path(out)
    if not (src / "config.json").is_file():
        raise ConfigError(f"{src} is not a Hugging Face model directory (no config.json)")
    if (out / "checkpoints").exists():
        raise ConfigError(f"--out {out} already holds checkpoints; choose an empty directory")
    hf = json.loads((src / "config.json").read_text())
    model_cfg = model_config_from_hf(hf)
    if not (src / "tokenizer.json").is_file():
        raise ConfigError(f"{src} has no tokenizer.json (a fast tokenizer is needed to train)")
    tok = Tokenizer.load(src / "tokenizer.json")  # fails early without an EOD token
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "tokenizer.json", out / "tokenizer.json")
    cfg = config_from_dict({
        "model": model_cfg,
        "train": {"seq_len": min(128, model_cfg["max_seq_len"])},
        "data": {"tokenizer": str((out / "tokenizer.json").resolve())},
        "logging": {"run_dir": str(out)}})
    validate(cfg)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"tokenizer of {src} has {tok.vocab_size} tokens, more than "
                          f"vocab_size={cfg.model.vocab_size}")
    model = build_model(cfg.model, "cpu")
    sd = from_hf_llama_state_dict(read_safetensors(src), cfg.model)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ConfigError(f"weights of {src} do not fit the model of its config.json: missing "
                          f"{', '.join(missing) or 'none'}; unexpected "
                          f"{', '.join(unexpected) or 'none'}")
    save_config(cfg, out / "config.yaml")
    path = ckpt.save_model(ckpt.checkpoint_dir(cfg), 0, model, cfg,
                           {"source": str(src.resolve())})
    log(f"imported {src} ({model.num_params(non_embedding=False):,} parameters) into {path}; "
        f"continue with: llmtrain train {out / 'config.yaml'}")
    return out


# ----------------------------------------------------------------------------------------------
# CLI


def cmd_export(args: argparse.Namespace) -> int:
    export_hf(args.checkpoint, args.out, dtype=args.dtype,
              max_shard_bytes=parse_size(args.max_shard_size), config=args.config)
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    import_hf(args.directory, args.out)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a checkpoint as a Hugging Face model directory",
        description="Write CHECKPOINT (<run>/checkpoints/step_N, or a run dir: its newest intact "
                    "checkpoint) as config.json + safetensors + tokenizer files that "
                    "transformers' AutoModelForCausalLM / AutoTokenizer load (Llama or GPT-2 "
                    "layout, chosen from the model config).")
    p.add_argument("checkpoint", help="checkpoint directory or run directory")
    p.add_argument("--format", choices=["hf"], default="hf", help="output format (default hf)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--dtype", choices=list(_DTYPES), default="float32",
                   help="dtype of the exported weights (default float32)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="split safetensors above this size (default 5GB)")
    p.add_argument("--config", help="run config (default: the run's config.yaml)")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser(
        "import-hf", help="start a run from a Hugging Face Llama checkpoint",
        description="Write run directory OUT (config.yaml from DIR/config.json, tokenizer.json, "
                    "and a model-only DCP checkpoint checkpoints/step_0) so that "
                    "`llmtrain train OUT/config.yaml` continues training DIR's weights.")
    p.add_argument("directory", metavar="DIR", help="HF model directory (config.json, "
                                                    "safetensors, tokenizer.json)")
    p.add_argument("--out", required=True, metavar="OUT", help="run directory to create")
    p.set_defaults(func=cmd_import_hf)
