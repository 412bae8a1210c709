"""The memory planner: does a model fit a GPU, before anything is downloaded or started.

``plan_model`` reads config.json and the safetensors headers (never the weights) and returns a
``Plan``; ``check_gpu_before_start`` repeats the check against the real GPUs' free memory.
"""

from .lora import LoraMemory, LoraSpec, lora_memory
from .plan import GpuCheck, Overhead, Plan, check_gpu_before_start, estimate_overhead, plan_from_facts, plan_model
from .sources import ModelFacts, ModelSourceError

__all__ = [
    "GpuCheck",
    "LoraMemory",
    "LoraSpec",
    "ModelFacts",
    "ModelSourceError",
    "Overhead",
    "Plan",
    "check_gpu_before_start",
    "estimate_overhead",
    "lora_memory",
    "plan_from_facts",
    "plan_model",
]
