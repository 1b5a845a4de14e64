class CheckpointError(Exception):
    """A checkpoint that cannot be used: the message names the file and the problem."""
