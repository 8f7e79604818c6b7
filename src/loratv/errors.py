"""The one exception type the CLI turns into a one-sentence message and exit code 2."""


class LoratvError(Exception):
    """Bad input or an impossible request; the message is one sentence naming the file and the problem."""


# every character str.splitlines() breaks a line at, and how it is shown instead
LINE_BREAKS = str.maketrans({c: c.encode("unicode_escape").decode("ascii") for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"})


def one_line(message) -> str:
    """A name from a hostile file may hold line breaks (any that str.splitlines() splits on): escaped, so that an
    error stays one line."""
    return str(message).translate(LINE_BREAKS)
