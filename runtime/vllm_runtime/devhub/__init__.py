"""A Hub-compatible loopback server and a tiny-model generator for the demo, tests and benchmarks."""
