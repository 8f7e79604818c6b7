#!/usr/bin/env python
"""Seed-compatible alias of `loratv compare`: python compare_lora_task_vector.py --base_model B --lora_path A
--task_vector_path TV --output_dir OUT --generate_plots.

Flags: --base_model --lora_path --task_vector_path --output_dir --tolerance --device --generate_plots
--detailed_report --architecture_analysis --force --quiet (see --help). Exit 0 equivalent, 1 not, 2 bad input.
"""

import sys

from loratv.cli.seed_scripts import compare_main

if __name__ == "__main__":
    sys.exit(compare_main())
