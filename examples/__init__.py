"""The main job (`examples/train.py`), importable as `examples.train` by the benchmarks and tests
that reuse its logging callback."""
