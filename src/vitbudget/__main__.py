"""`python -m vitbudget ...` (and `torchrun -m vitbudget ...`): the same as the `vitbudget` command."""
import sys

from .cli import main

sys.exit(main())
