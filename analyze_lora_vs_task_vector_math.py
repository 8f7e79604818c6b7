#!/usr/bin/env python
"""Seed-compatible alias of `loratv analyze --spectrum`: python analyze_lora_vs_task_vector_math.py --lora_file
comparison_results/lora_deltas.safetensors --task_vector_file task_vectors --output_dir analysis --verbose.

Flags: --lora_file --task_vector_file --base_model --output_dir --verbose --no_plots --device --force --quiet
(see --help). With no file argument it analyses the embedded example.
"""

import sys

from loratv.cli.seed_scripts import analyze_main

if __name__ == "__main__":
    sys.exit(analyze_main())
