"""`python -m unsloth_med <command>`, the same as the `unsloth-med` console script."""
from .cli import main

main()
