"""Executors: where a command's independent units of work (output shards, tensor groups) run — in this process, or
as Ray tasks on a cluster (docs/scaling.md)."""
