"""The benchmarks: each script runs as ``python -m bench.<name>`` from the repository root and
takes ``--smoke`` (tiny sizes, correctness only) and ``--out``; bench/common.py is their one
prologue (environment, paths, the report header). Reports quoted in the docs are in
bench/results/, each naming the command and commit that made it."""
