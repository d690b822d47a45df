"""Errors about the user's input, as opposed to bugs: the CLI reports them and exits 2."""


class DataError(ValueError):
    """Bad or insufficient input data; the message names the input, the counts and what to do."""
