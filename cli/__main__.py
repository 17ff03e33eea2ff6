"""`python -m ruvllm.cli` runs the `ruvllm` command."""

import sys

from ruvllm.cli.main import main

sys.exit(main())
