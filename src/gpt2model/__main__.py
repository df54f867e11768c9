"""``python -m gpt2model ...`` is the ``gpt2`` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
