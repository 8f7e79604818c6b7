"""The one exception type the CLI turns into a one-sentence message and exit code 2."""


class LoratvError(Exception):
    """Bad input or an impossible request; the message is one sentence naming the file and the problem."""

