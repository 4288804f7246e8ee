"""Microbenchmarks of the eagle3 ops against the compositions they replace.

``python -m bench`` (from the repository root) sweeps the ops over token counts and
hidden sizes on CUDA (events, rotated inputs, CUDA graphs for small T) or CPU, checks
every implementation against the float64 reference before timing it, and writes a
markdown table, a JSON file and plots (DESIGN.md section 5, STYLE.md point 9).
``pytest bench/`` runs the CPU pytest-benchmark suite and the CPU speed-up checks.

Modules: :mod:`bench.cases` (what is measured: inputs, implementations, references,
byte and FLOP counts), :mod:`bench.timing` (how: clocks, ceilings),
:mod:`bench.report` (tables, JSON, plots), :mod:`bench.runner` (the command line).
"""
