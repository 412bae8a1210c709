"""The runtime that runs inside model pods: cache, serve, plan, and cache management.

The runtime never imports the operator. The operator imports a few small contract
modules from here (``layout``, ``vllm_args``, ``summary``, ``planner``) so that the
objects it writes and the processes that run in them cannot disagree.
"""

__version__ = "0.1.0"
