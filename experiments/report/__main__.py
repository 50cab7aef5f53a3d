"""``python -m experiments.report [--quick] [--out DIR] [--seeds N] [--threads N]``: see the package docstring."""

from experiments.report import main

main()
