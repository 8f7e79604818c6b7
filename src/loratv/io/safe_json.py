"""JSON from untrusted files (safetensors headers, indexes, configs), parsed strictly and failing in one sentence.

Python's json module accepts duplicate keys (the last wins, so two parsers can read one file two ways), NaN and
Infinity, and raises ValueError or RecursionError (not JSONDecodeError) on huge integers and deep nesting; every one
of those becomes a LoratvError here.
"""

import json

from loratv.errors import BadInputError
from loratv.io import storage

MAX_JSON_BYTES = 64 << 20  # configs and indexes are kilobytes; a bigger one is not read into memory


class _Reject(Exception):
    pass


def _pairs(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise _Reject(f"duplicate key '{key[:80]}'")
        out[key] = value
    return out


def _constant(name):
    raise _Reject(f"{name} is not JSON")


def _check_text(value):
    """Lone surrogates (from \\ud800 escapes) decode but cannot be written or printed as UTF-8."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise _Reject("a string holds an invalid \\u escape (a lone surrogate)") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_text(k)
            _check_text(v)
    elif isinstance(value, list):
        for v in value:
            _check_text(v)


def loads(raw, where, what: str = "not valid JSON"):
    """Parse bytes (UTF-8) or text; any problem raises BadInputError(f"{where}: {what} (reason).").

    Args:
        raw: bytes, bytearray or memoryview of UTF-8, or a str.
        where: what the text came from (a path), to begin the message.
        what: what the problem is called in the message.

    Returns:
        The parsed value (dicts, lists, strings, numbers, bools, None).

    Raises:
        LoratvError: not UTF-8, invalid JSON, a duplicate key, NaN or Infinity, a lone surrogate, nesting too deep
            or a number with too many digits.
    """
    try:
        text = str(raw, "utf-8") if isinstance(raw, (bytes, bytearray, memoryview)) else raw  # memoryview has no .decode
        value = json.loads(text, object_pairs_hook=_pairs, parse_constant=_constant)
        _check_text(value)
        return value
    except UnicodeDecodeError:
        reason = "not UTF-8"
    except json.JSONDecodeError as exc:
        reason = f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    except _Reject as exc:
        reason = str(exc)
    except RecursionError:
        reason = "nested too deeply"
    except ValueError:  # integers beyond sys.get_int_max_str_digits()
        reason = "a number with too many digits"
    raise BadInputError(f"{where}: {what} ({reason}).")


def read(path, what: str = "not valid JSON"):
    """A JSON file, read as data only.

    Args:
        path: the file (at most MAX_JSON_BYTES).
        what: what the problem is called in an error message.

    Returns:
        The parsed value, as `loads` gives it.

    Raises:
        LoratvError: the file cannot be read, is larger than MAX_JSON_BYTES, or is not strict JSON (see `loads`).
    """
    path = storage.as_path(path)
    try:
        if isinstance(path, storage.RemotePath):  # one ranged request, capped like the local read
            raw = storage.read_range(path, 0, MAX_JSON_BYTES + 1)
        else:
            with open(path, "rb") as f:
                raw = f.read(MAX_JSON_BYTES + 1)
        if len(raw) > MAX_JSON_BYTES:
            raise BadInputError(f"{path}: {what} (larger than {MAX_JSON_BYTES >> 20} MiB, far beyond any config or index).")
    except OSError as exc:
        raise BadInputError(f"{path}: cannot be read ({exc.strerror}).") from None
    return loads(raw, path, what)
