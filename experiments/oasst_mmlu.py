#!/usr/bin/env python
"""Sylva's reference experiment: fine-tune on OASST1 (guanaco), score by 5-shot MMLU.

    python experiments/oasst_mmlu.py                 # embedded SmolLM2-135M, offline, ~15 min on 2 CPU cores
    python experiments/oasst_mmlu.py --preset smoke  # every stage in seconds
    python experiments/oasst_mmlu.py --preset paper  # LLaMA-7B as published (GPU + hub)
    python experiments/oasst_mmlu.py --help

All logic lives in sylva_jax.experiment (usable from Python as well).
"""
import sys

from sylva_jax.experiment import main

if __name__ == "__main__":
    sys.exit(main())
