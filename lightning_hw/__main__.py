"""`python -m lightning_hw`: the command line (see lightning_hw.cli)."""

from lightning_hw.cli import main

if __name__ == "__main__":
    main()
