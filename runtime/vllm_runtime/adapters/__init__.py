"""LoRA adapters served next to the base model without restarting vLLM.

- ``desired``: the adapters file (the operator's ConfigMap) and its entries;
- ``checks``: an adapter's facts (rank, target modules, shapes) and the checks against the base model;
- ``errors``: a class per reason an adapter is not loaded;
- ``converge``: the background loop that loads and unloads through vLLM's runtime adapter API;
- ``lora_settings``: vLLM's LoRA flags with defaults from the adapters' ranks.
"""

from vllm_runtime.adapters.checks import AdapterFacts, check_adapter, read_adapter_facts, smallest_vllm_rank
from vllm_runtime.adapters.converge import AdapterConverger, VllmAdapterAPI
from vllm_runtime.adapters.desired import AdaptersFileError, DesiredAdapter, read_adapters_file
from vllm_runtime.adapters.errors import AdapterError, classify_vllm_error
from vllm_runtime.adapters.settings import LoraSettings, lora_settings

__all__ = [
    "AdapterConverger",
    "AdapterError",
    "AdapterFacts",
    "AdaptersFileError",
    "DesiredAdapter",
    "LoraSettings",
    "VllmAdapterAPI",
    "check_adapter",
    "classify_vllm_error",
    "lora_settings",
    "read_adapter_facts",
    "read_adapters_file",
    "smallest_vllm_rank",
]
