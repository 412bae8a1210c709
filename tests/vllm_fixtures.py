"""Real-vLLM fixtures (filled by the runtime-serve work)."""
