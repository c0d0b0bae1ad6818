"""Peak memory of `llmtrain import-hf`: the whole-model import it replaced (build and initialise
the model on the CPU, read every safetensors tensor, `load_state_dict`, save) against the
streaming one (`train/export.py import_hf`: the model on the meta device, each weight read,
converted to fp32 and written to the checkpoint before the next one is read).

The HF directory is a synthetic Llama written by `transformers` (random weights, default
~106M parameters, untied output layer) with `save_pretrained`, in fp32 and in bf16, plus a small
BPE tokenizer.json. Each import runs in a fresh subprocess: its peak resident set (VmHWM of
/proc/self/status, `llmtrain/train/memory.py` PeakMemory) above the resident set just before
the import (torch and the llmtrain modules it uses already imported). MALLOC_MMAP_THRESHOLD_
makes glibc return freed tensors to the OS, so the resident set follows the live tensors. Both
imports must write the same checkpoint (sha256 of its shard).

    python benchmarks/import_memory.py [--layers 8] [--d-model 768] [--vocab 32000]
        [--ffn 2048] [--dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("whole", "streaming")


def import_whole(src: Path, out: Path) -> None:
    """import-hf as it was before streaming: checks, then build + load the whole model + save."""
    from llmtrain.config import config_from_dict
    from llmtrain.model import build_model
    from llmtrain.train import checkpoint as ckpt
    from llmtrain.train.export import (from_hf_llama_state_dict, model_config_from_hf, read_json,
                                       read_safetensors)
    cfg = config_from_dict({"model": model_config_from_hf(read_json(src / "config.json"))})
    model = build_model(cfg.model, "cpu")
    model.load_state_dict(from_hf_llama_state_dict(read_safetensors(src), cfg.model))
    ckpt.save_model(out / "checkpoints", 0, model, cfg)


def one(method: str, src: Path, out: Path) -> dict:
    """Run in the subprocess: peak RSS above the baseline and time of one import."""
    import safetensors.torch  # noqa: F401  (imported before the baseline, as the rest)
    import torch

    import llmtrain.data.tokenizer  # noqa: F401
    import llmtrain.model  # noqa: F401
    from llmtrain.train.export import import_hf
    from llmtrain.train.memory import PeakMemory
    meter = PeakMemory(torch.device("cpu"))
    assert meter.available, "needs /proc/self/status and a writable /proc/self/clear_refs"
    t0 = time.perf_counter()
    if method == "whole":
        import_whole(src, out)
    else:
        import_hf(src, out, log=lambda msg: None)
    seconds = time.perf_counter() - t0
    meter.mark("import")
    shard = out / "checkpoints" / "step_0" / "__0_0.distcp"
    return {"peak_bytes": meter.peak_bytes["import"], "seconds": seconds,
            "sha256": hashlib.sha256(shard.read_bytes()).hexdigest()[:16]}


def write_hf_dir(out: Path, dtype: str, args: argparse.Namespace) -> tuple[int, int]:
    """A random Llama saved by transformers in `dtype`, and a tokenizer.json; (its parameters,
    the elements of its largest weight)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    from llmtrain.data.tokenizer import Tokenizer
    logging.disable_progress_bar()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.d_model,
                         intermediate_size=args.ffn, num_hidden_layers=args.layers,
                         num_attention_heads=args.d_model // 64,
                         num_key_value_heads=args.d_model // 64, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True)
    text = Path(json.__file__).read_text()
    Tokenizer.train_bpe(iter([text]), 300).save(out / "tokenizer.json")
    return (sum(p.numel() for p in model.parameters()),
            max(p.numel() for p in model.parameters()))


def measure(method: str, src: Path, out: Path) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, __file__, "--one", method, "--src", str(src), "--out",
                        str(out)], capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"{method} import of {src} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--dir", help="working directory (default: a temporary one)")
    ap.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, Path(args.src), Path(args.out))))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root, mib = Path(tmp), 2 ** 20
        print(f"synthetic Llama: {args.layers} layers, d_model {args.d_model}, ffn {args.ffn}, "
              f"vocab {args.vocab}, untied; peak = VmHWM above the RSS before the import")
        print(" file dtype |  params | fp32 MiB largest | whole MiB  streaming MiB  ratio | "
              "whole s streaming s | same checkpoint")
        for dtype in ("float32", "bfloat16"):
            src = root / f"hf-{dtype}"
            n, largest = write_hf_dir(src, dtype, args)
            rows = {m: measure(m, src, root / f"out-{dtype}-{m}") for m in METHODS}
            whole, stream = rows["whole"], rows["streaming"]
            print(f" {dtype:>10} | {n / 1e6:6.1f}M | {n * 4 / mib:8,.0f} "
                  f"{largest * 4 / mib:7,.0f} | "
                  f"{whole['peak_bytes'] / mib:9,.0f}  {stream['peak_bytes'] / mib:13,.0f}  "
                  f"{stream['peak_bytes'] / whole['peak_bytes']:5.2f} | "
                  f"{whole['seconds']:7.2f} {stream['seconds']:11.2f} | "
                  f"{'yes' if whole['sha256'] == stream['sha256'] else 'NO'}")


if __name__ == "__main__":
    main()
