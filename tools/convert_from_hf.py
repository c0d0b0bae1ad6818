#!/usr/bin/env python
"""Hugging Face Llama directory -> run directory to train on: the same options as
`llmtrain import-hf`. A non-empty --out needs --overwrite.

    python tools/convert_from_hf.py path/to/llama --out runs/from-llama
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from llmtrain.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["import-hf", *sys.argv[1:]]))
