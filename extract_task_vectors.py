#!/usr/bin/env python
"""Seed-compatible alias of `loratv extract`: python extract_task_vectors.py --base_model B --finetuned_model F.

Flags: --base_model --finetuned_model --output_dir --device --trust_remote_code --dense --config FILE.yml --force
--quiet (see --help); a --config YAML file's keys are these flag names.
"""

import sys

from loratv.cli.seed_scripts import extract_task_vectors_main

if __name__ == "__main__":
    sys.exit(extract_task_vectors_main())
