"""Post-LN vs Pre-LN vs DeepNorm in a 12-layer (6+6) encoder-decoder, no warmup, same lr.

Xiong et al. 2020 ("On Layer Normalization in the Transformer Architecture") argue that Post-LN
needs a learning-rate warmup because its gradients near the output are large at initialisation,
while Pre-LN trains without one; DeepNorm (Wang et al. 2022) keeps Post-LN's placement but scales
the residual and the initialisation to make it stable. This trains the three on the stdlib corpus
with span corruption, warmup 0, and plots the training loss.

    python examples/norm_placement_study.py [--steps 150] [--lr 1e-3] [--out runs/norm-study]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

VARIANTS = {"post-LN": "post", "pre-LN": "pre", "DeepNorm": "deepnorm"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", default="runs/norm-study")
    ap.add_argument("--plot", default="docs/norm_placement_no_warmup.png")
    args = ap.parse_args()
    curves = {}
    for name, position in VARIANTS.items():
        run = Path(args.out) / position
        sets = {"model.arch": "encoder_decoder", "model.n_encoder_layers": 6,
                "model.n_decoder_layers": 6, "model.d_model": 128, "model.n_heads": 4,
                "model.norm": "layernorm", "model.norm_position": position,
                "model.position": "sinusoidal", "model.activation": "gelu",
                "train.steps": args.steps, "train.global_batch_size": 16,
                "train.micro_batch_size": 16, "train.seq_len": 128, "train.eval_every": 0,
                "train.log_every": 1, "optim.lr": args.lr, "optim.min_lr": args.lr,
                "optim.warmup_steps": 0, "optim.schedule": "constant", "train.grad_clip": 0,
                "logging.run_dir": str(run), "logging.tensorboard": False,
                "logging.progress": False, "checkpoint.every": 0}
        cmd = [sys.executable, "-m", "llmtrain", "train"]
        for k, v in sets.items():
            cmd += ["--set", f"{k}={v}"]
        print(f"== {name}: {run}", flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        curves[name] = [(r["step"], r["loss"]) for r in recs]
        print("   loss at steps 10/50/last: "
              + " / ".join(f"{dict(curves[name]).get(s, float('nan')):.3f}"
                           for s in (10, 50, args.steps)), flush=True)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in curves.items():
        ax.plot(*zip(*pts), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (span corruption)")
    ax.set_title(f"6+6-layer encoder-decoder, no warmup, lr {args.lr:g}, no clipping")
    ax.legend()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110, bbox_inches="tight")
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
