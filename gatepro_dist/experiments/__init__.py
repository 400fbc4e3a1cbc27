"""What users study with the engine: sweeps of runs, their reports, and benchmarks."""
