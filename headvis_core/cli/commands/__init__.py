"""CLI subcommands: each module defines ``register(subparsers)`` (see :mod:`headvis_core.cli.main`)."""
