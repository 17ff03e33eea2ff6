"""`python -m ruvllm_cli` runs the `ruvllm` command."""

import sys

from ruvllm_cli.main import main

sys.exit(main())
