"""The `loratv` command line and the seed study's script entry points: arguments in, library calls out."""

from loratv.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
