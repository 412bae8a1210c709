"""The kopf operator that reconciles VLLMModel resources into cached, running vLLM deployments."""

__version__ = "0.1.0"
