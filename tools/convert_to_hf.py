#!/usr/bin/env python
"""Checkpoint (or run directory: its newest good checkpoint) -> Hugging Face model directory: the
same options as `llmtrain export`. A non-empty --out needs --overwrite.

    python tools/convert_to_hf.py runs/tiny --out hf/tiny
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from llmtrain.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
