"""Shared fixtures. Each fixture family lives in its own module next to this file:

- ``hub_fixtures``: a loopback Hugging Face Hub (vllm_runtime.devhub) with tiny generated models.
- ``vllm_fixtures``: a real vLLM (CPU build) served through ``vllm-runtime serve`` for end-to-end tests.
- ``prometheus_fixtures``: a real Prometheus on loopback, a vLLM that queues, a load generator, the HPA's formula.
"""

pytest_plugins = ["hub_fixtures", "vllm_fixtures", "prometheus_fixtures"]
