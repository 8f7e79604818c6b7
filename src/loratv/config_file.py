"""YAML option files whose keys are a command's flag names (e.g. `base_model: org/name`), read as data only."""

import argparse

import yaml

from .errors import LoratvError


def read_flag_file(path, parser: argparse.ArgumentParser, aliases: dict) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise LoratvError(f"{path}: cannot be read ({exc.strerror}).") from None
    except yaml.YAMLError:
        raise LoratvError(f"{path}: not valid YAML.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LoratvError(f"{path}: must be a mapping of flag names to values.")
    dests = {a.dest for a in parser._actions}  # noqa: SLF001
    out = {}
    for key, value in data.items():
        dest = aliases.get(str(key), str(key).lstrip("-").replace("-", "_"))
        if dest not in dests or dest in ("config", "help"):
            raise LoratvError(f"{path}: unknown option '{key}'.")
        out[dest] = value
    return out
