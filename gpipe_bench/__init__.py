"""gpipe-bench: a GPipe engine for current PyTorch and a harness for the published GPipe tables.

The engine lives in :mod:`gpipe_bench.pipe` and depends on torch alone; everything
else in the package (models, configs, measurements, reports) is the harness
around it.
"""

__version__ = "0.1.0"
