"""`python -m squeezegen.cli` (and `torchrun -m squeezegen.cli`): the `squeezegen` command."""

import sys

from squeezegen.cli import main

sys.exit(main())
