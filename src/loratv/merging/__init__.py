"""Model merging (mergekit's methods, mergekit's recipes): the methods' arithmetic for one tensor
(`methods.py`, `sparsify.py`) and the YAML recipe read and resolved per tensor (`recipe.py`). The streaming command
is ops/merge_models.py; docs/merging.md states the semantics and where they differ from mergekit."""
