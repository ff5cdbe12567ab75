"""`python -m evals`: the same as the `quietdepth-eval` command."""

from evals.cli import main

main()
