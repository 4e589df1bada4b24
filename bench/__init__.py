"""fastrnn's benchmarks: the pytest-benchmark suite (``python -m pytest bench/
--benchmark-only``) and ``python -m bench``, the side-by-side runner against
PyTorch and ONNX Runtime (same as ``fastrnn bench``). See docs/benchmarks.md."""
