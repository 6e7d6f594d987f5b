"""Command-line tools run as modules, e.g. ``.venv/bin/python -m tools.model_parity``."""
