"""Studies on top of the core: training, sweeps, search and latency benchmarks."""
