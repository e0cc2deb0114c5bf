"""``sealroom.cli:main``, the console script's entry point, and ``python -m sealroom.cli`` (both kept
where they have always been); the CLI itself is :mod:`sealroom.app.cli`."""

from sealroom.app.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
