#!/usr/bin/env python
"""Seed-study research script, alias of `loratv structure` with the seed's flag names (see --help).

Everything it does lives in loratv.seed_research_scripts and the library; this file only calls it.
"""

import sys

from loratv.cli.seed_research_scripts import visualize_model_structure_main

if __name__ == "__main__":
    sys.exit(visualize_model_structure_main())
