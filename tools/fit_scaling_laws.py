#!/usr/bin/env python
"""Fit scaling laws: the same options as `llmtrain scaling fit` (see docs/scaling.md).

    python tools/fit_scaling_laws.py --csv points.csv --n-col N --c-col C --loss-col loss
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from llmtrain.config import ConfigError  # noqa: E402
from llmtrain.scaling.cli import add_fit_arguments, run_fit  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fit_scaling_laws.py", description=__doc__.split("\n")[0])
    add_fit_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_fit(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
