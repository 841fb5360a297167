"""The one exception type that the CLI turns into a single line and exit code 2."""


class UserError(Exception):
    """Bad input from the user: config, data, checkpoint or model mismatch.

    The message must name what is wrong and what is allowed; the CLI prints it as one line
    without a traceback and exits with code 2. A line break in it (a value quoted from the user's
    input, a library's message) is written as ``\\n``, so it stays one line whatever it quotes.
    """

    def __init__(self, message: object = "") -> None:
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))

    # Under torchrun: True when every rank raises this same error from the same inputs (a refused
    # config, a check before training, a verdict the ranks share), so that rank 0 alone prints it;
    # False (the default) when it may be this rank's own (a write that failed here, a dead peer).
    rank_0_reports: bool = False
