"""``python -m streams.cli``: the same as the ``memstream`` console script."""

from streams.cli.app import app

app()
