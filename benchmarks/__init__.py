"""Benchmark suite of the kernel library: ``python -m benchmarks``.

Suites (``python -m benchmarks [SUITE ...]``):

* ``table1`` (default) - measures what Table 1 of Vaswani et al. (2017), "Attention Is All You Need",
  states: per-layer complexity (FLOPs), sequential operations and maximum path length of
  self-attention, recurrent and convolutional layers, and their forward throughput over sequence
  length (:mod:`benchmarks.table1`).

Each run writes ``report.md``, ``results.json`` and PNG plots into a folder (default
``bench-out/<timestamp>/``) and prints that folder's path as its last line. See
:mod:`benchmarks.__main__` for the command line.
"""
