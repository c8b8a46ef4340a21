"""The ``qwenvl`` console script; :func:`qwenvl.cli.main.main` is the entry point."""
