"""The exception types of loratv: LoratvError (what the CLI turns into a one-sentence message and exit code 2) and
the subclasses a caller of the Python API may want to branch on.

A message names the parameters it is about with `param(...)`, so that it reads in the caller's terms: as Python
keyword arguments in `str(exc)` (`precision='fp8'`, `force=True`) and as command-line flags in `cli_message(exc)`
(`--precision fp8`, `--force`), which is what the `loratv` command prints.
"""

_OPEN, _SEP, _CLOSE = "\ue000", "\ue001", "\ue002"  # private-use characters around one parameter mention
_UNSET = object()


def param(name: str, value: object = _UNSET, *, flag: str | None = None, flag_value: str | None = None) -> str:
    """One parameter named in an error message, rendered per audience by `str(exc)` and `cli_message(exc)`.

    Args:
        name: the Python keyword argument (`precision`).
        value: the value given, if the message shows it (a bool renders as just the flag on the command line).
        flag: the command-line flag, when it is not `--` + the name with dashes (`--no-autocast-adapter-dtype`).
        flag_value: the value as written after the flag, when not `str(value)`.

    Returns:
        A marked piece of text for an f-string message.
    """
    api = name if value is _UNSET else f"{name}={value!r}"
    cli = flag or "--" + name.replace("_", "-")
    if flag_value is not None:
        cli = f"{cli} {flag_value}"
    elif value is not _UNSET and not isinstance(value, bool):
        cli = f"{cli} {value}"
    return f"{_OPEN}{api}{_SEP}{cli}{_CLOSE}"


def _render(text: str, cli: bool) -> str:
    out, rest = [], text
    while _OPEN in rest:
        head, _, tail = rest.partition(_OPEN)
        body, closed, rest = tail.partition(_CLOSE)
        api, _, flag = body.partition(_SEP)
        out.append(head + ((flag if cli else api) if closed else body))
    return "".join(out) + rest


class LoratvError(Exception):
    """Bad input or an impossible request; the message is one sentence naming the file and the problem.

    `str(exc)` names parameters as Python keyword arguments; `cli_message(exc)` as the command line's flags.
    """

    def __str__(self) -> str:
        return _render(super().__str__(), cli=False)

    def cli_message(self) -> str:
        """The message with parameters named as `loratv` command-line flags (what the CLI prints).

        Returns:
            The message, each `param(...)` mention rendered as its flag (`--precision fp8`).
        """
        return _render(super().__str__(), cli=True)


class BadInputError(LoratvError):
    """An input that cannot be used: a parameter value out of range, or a file that is missing, unreadable,
    malformed, mismatched or non-finite."""


class UnsupportedAdapterError(LoratvError):
    """An adapter of a kind, or with a feature, that loratv refuses to merge or compare (rather than guess)."""


class OutputExistsError(LoratvError):
    """The output path exists and `force=True` was not given (or it is, holds or lies inside an input)."""


class ObjectStoreError(BadInputError):
    """An object-store URL (s3://, gs://, hf://) that is missing, truncated, cannot be reached or is refused, or whose
    filesystem package (fsspec, s3fs) is not installed."""


def cli_message(exc: BaseException) -> str:
    """An exception's message as the command line shows it: parameters named as flags.

    Args:
        exc: any exception; only a LoratvError carries `param(...)` mentions.

    Returns:
        `exc.cli_message()` for a LoratvError, else `str(exc)`.
    """
    return exc.cli_message() if isinstance(exc, LoratvError) else str(exc)


# every character str.splitlines() breaks a line at, and how it is shown instead
LINE_BREAKS = str.maketrans({c: c.encode("unicode_escape").decode("ascii") for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"})


def one_line(message) -> str:
    """A name from a hostile file may hold line breaks (any that str.splitlines() splits on): escaped, so that an
    error stays one line.

    Args:
        message: any object; its `str()` is escaped.

    Returns:
        `str(message)` with every line break written as its escape (`\\n`, `\\u2028`, ...).
    """
    return str(message).translate(LINE_BREAKS)
