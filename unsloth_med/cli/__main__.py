"""`python -m unsloth_med.cli <command>`, the same as the `unsloth-med` console script."""
from . import main

main()
