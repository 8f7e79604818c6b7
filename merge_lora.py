#!/usr/bin/env python
"""Seed-compatible alias of `loratv merge`: python merge_lora.py --precision fp32 --output_dir merged_model_fp32.

Flags: --base_model --lora_path --output_dir --precision {fp16,fp32,bf16} --device --force --quiet (see --help).
"""

import sys

from loratv.cli.seed_scripts import merge_lora_main

if __name__ == "__main__":
    sys.exit(merge_lora_main())
