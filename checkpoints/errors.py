"""Errors raised while reading or writing checkpoints."""


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed or does not fit the model; the message names the
    tensor or file at fault."""
