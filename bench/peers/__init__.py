"""Peers measured side by side with memstream, each in its own virtual environment."""
