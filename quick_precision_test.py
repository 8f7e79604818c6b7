#!/usr/bin/env python
"""Seed-compatible fp16-vs-fp32 task-vector check: python quick_precision_test.py (defaults --fp16_dir
task_vectors_fp16/ --fp32_dir task_vectors_fp32/, as in the seed's walkthrough).

Flags: --fp16_dir --fp32_dir --base_model --json (see --help).
"""

import sys

from loratv.cli.seed_scripts import quick_precision_main

if __name__ == "__main__":
    sys.exit(quick_precision_main())
