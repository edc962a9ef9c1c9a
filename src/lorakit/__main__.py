"""`python -m lorakit ...` (also what `torchrun -m lorakit` runs)."""

from .cli import main

main()
