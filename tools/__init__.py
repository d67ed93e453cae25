"""Research kits beside the pipeline: benchmark, frequency analysis, ablations, reader study, HTML report
and the figure scripts of docs/ (their outputs go to docs/generated/).

Run each from the repository root as a module: ``python -m tools.<name> --help``.
"""
