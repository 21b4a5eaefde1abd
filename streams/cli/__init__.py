"""The ``memstream`` command line."""
