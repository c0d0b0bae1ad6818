"""tokens/s of configs/tiny.yaml's training step vs. the same-shape HF LlamaForCausalLM, on the
CPU, in one run (issue 13's CPU row: ours must not be slower).

    python benchmarks/cpu_step.py [--steps 20] [--batch 16]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from llmtrain.bench import bench
from llmtrain.config import load_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3, help="alternate ours/HF this many times")
    args = ap.parse_args()
    cfg = load_config(Path(__file__).parent.parent / "configs" / "tiny.yaml",
                      ["train.device=cpu"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    best: dict[str, float] = {}
    for _ in range(args.rounds):  # alternate so background load hits both alike; keep the best
        out = bench(cfg, steps=args.steps, warmup=args.warmup, batch=args.batch, compare_hf=True,
                    compile_hf=False, log=lambda *a: None)
        for name, r in out["results"].items():
            best[name] = max(best.get(name, 0.0), r["tokens_per_s"])
    print(f"{'model':<12} {'tokens/s':>12}")
    for name, tps in best.items():
        print(f"{name:<12} {tps:>12,.0f}")
    print(f"llmtrain / hf eager: {best['llmtrain'] / best['hf eager']:.2f}x")


if __name__ == "__main__":
    main()
