class CheckpointError(Exception):
    """A checkpoint that cannot be used: the message names the file and the problem."""


class TokenizerError(ValueError):
    """A tokenizer folder that cannot become a tokenizer stage: the message names the folder and the problem."""
