#!/usr/bin/env python
"""Seed-compatible alias of `loratv validate`: python final_validation.py (no arguments: the embedded example).

Flags: --base_model --lora_path --output_dir --precision --device --force --quiet (see --help).
Exit 0 equivalent, 1 not, 2 bad input.
"""

import sys

from loratv.cli.seed_scripts import final_validation_main

if __name__ == "__main__":
    sys.exit(final_validation_main())
