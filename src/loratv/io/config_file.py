"""YAML option files whose keys are a command's flag names (e.g. `base_model: org/name`), read as data only.

The safe loader builds nothing but plain data (no `!!python/...` tags), and every value is checked against the
flag it sets as the command line would be: a switch takes true/false, a flag with choices one of them, a typed
flag a value its type accepts, any other flag a string (argparse does not convert defaults that are not strings,
so an unchecked `dense: "no"` would switch --dense on, and `base: [1, 2]` would reach the code as a list).
"""

import argparse

import yaml

from loratv.errors import BadInputError
from loratv.io import storage

MAX_CONFIG_BYTES = 1 << 20


def _read_yaml(path):
    try:
        if storage.is_url(path):  # one ranged request, capped like the local read
            raw = storage.read_range(path, 0, MAX_CONFIG_BYTES + 1)
        else:
            with open(path, "rb") as f:
                raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise BadInputError(f"{path}: cannot be read ({exc.strerror}).") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise BadInputError(f"{path}: not a configuration file (larger than {MAX_CONFIG_BYTES >> 20} MiB).")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInputError(f"{path}: not valid YAML (not UTF-8).") from None
    try:
        return yaml.safe_load(text)
    except yaml.constructor.ConstructorError:
        raise BadInputError(f"{path}: holds a YAML tag that is not plain data (such as !!python/object); options are "
                          "read as data only.") from None
    except yaml.YAMLError:
        raise BadInputError(f"{path}: not valid YAML.") from None
    except RecursionError:
        raise BadInputError(f"{path}: not valid YAML (nested too deeply).") from None


def read_yaml_data(path) -> object:
    """A YAML file read as plain data (the safe loader: no `!!python/...` tags), at most 1 MiB.

    Args:
        path: the file.

    Returns:
        The parsed data (a mapping, list or scalar).

    Raises:
        BadInputError: unreadable, too large, not UTF-8, not valid YAML, or holding a non-data tag.
    """
    return _read_yaml(path)


def _scalar(path, key, action, value):
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise BadInputError(f"{path}: option '{key}' must be a single value, not {type(value).__name__}.")
    try:
        str(value).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a \ud800 escape: no file can be named by it
        raise BadInputError(f"{path}: option '{key}' holds an invalid \\u escape (a lone surrogate).") from None
    if action.type is not None:
        try:
            value = action.type(str(value))
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            raise BadInputError(f"{path}: option '{key}' has an invalid value '{str(value)[:80]}'.") from None
    elif not isinstance(value, str):
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise BadInputError(f"{path}: option '{key}' must be one of {', '.join(map(str, action.choices))}, "
                          f"not '{str(value)[:80]}'.")
    return value


def _checked(path, key, action, value):
    if action.nargs == 0:  # a switch (store_true / store_false)
        if not isinstance(value, bool):
            raise BadInputError(f"{path}: option '{key}' is a switch; give true or false.")
        return value  # the key names the destination, so the value is its value, whatever the flag's sense
    if action.nargs in ("+", "*"):
        values = value if isinstance(value, list) else [value]
        return [_scalar(path, key, action, v) for v in values]
    return _scalar(path, key, action, value)


def read_flag_file(path, parser: argparse.ArgumentParser, aliases: dict) -> dict:
    """Read a YAML options file and check every value against the flag it sets.

    Args:
        path: the YAML file (at most 1 MiB, UTF-8).
        parser: the command's parser; its actions say which flags exist and what each accepts.
        aliases: file key -> argparse dest, for keys that are not the dest with dashes as underscores.

    Returns:
        {dest: value} converted as the command line would (switches bool, typed flags through their type, lists for
        nargs "+"/"*", other flags str); keys with a null value are left out. {} for an empty file.

    Raises:
        LoratvError: the file cannot be read, is too large, is not UTF-8 or plain-data YAML, is not a mapping, names
            an unknown option (or config/help), or gives a value its flag does not accept.
    """
    data = _read_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: must be a mapping of flag names to values.")
    actions = {a.dest: a for a in parser._actions}  # noqa: SLF001
    out = {}
    for key, value in data.items():
        shown = str(key)[:80]
        dest = aliases.get(str(key), str(key).lstrip("-").replace("-", "_"))
        if dest not in actions or dest in ("config", "help"):
            raise BadInputError(f"{path}: unknown option '{shown}'.")
        if value is not None:  # `key: null` (or `key:`) leaves the flag's default
            out[dest] = _checked(path, shown, actions[dest], value)
    return out
