"""The Python API of loratv (docs/api.md); re-exported by the `loratv` package."""
