class CheckpointError(Exception):
    """A checkpoint that cannot be used: the message names the file and the problem."""


class ExportError(Exception):
    """Export failed; nothing was written at the destination."""
