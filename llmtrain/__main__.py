"""`python -m llmtrain ...` (what `torchrun -m llmtrain train ...` runs)."""

import sys

from llmtrain.cli import main

sys.exit(main())
