"""The ``meddiff`` command: one small module per subcommand, wired together in ``main``."""
