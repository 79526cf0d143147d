"""Entry point of ``python -m builder``."""

from .cli import exit_with, main

if __name__ == "__main__":
    exit_with(main())
