"""`python -m pocketdiffusion ...`: the same as the `pocketdiffusion` command."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
