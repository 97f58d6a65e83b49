"""Errors that are the user's to fix: the CLI prints them as one clear message."""


class UserError(Exception):
    """A problem with the spec, the run folder or the data, not a bug in clip-jax."""
