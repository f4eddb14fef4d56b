"""``python -m vitedge``: the same as the ``vitedge`` command."""

from .cli import main

if __name__ == "__main__":
    main()
