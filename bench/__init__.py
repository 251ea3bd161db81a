"""chatd benchmarks, run by `make bench`."""
