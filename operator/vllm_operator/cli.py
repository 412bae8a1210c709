"""``vllm-operator``: run the operator, render what it would create, print the CRD."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from . import crd
from .config import Config
from .render import RenderError, render_paths, to_yaml


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-operator",
        description="A Kubernetes operator for pinned, verified, memory-checked vLLM model deployments.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the operator against the current kube context")
    scope = run.add_mutually_exclusive_group()
    scope.add_argument(
        "-n", "--namespace", action="append", default=[], metavar="NS",
        help="watch this namespace (repeatable; default: VLLM_OPERATOR_NAMESPACES, else all namespaces)",
    )  # fmt: skip
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch all namespaces")
    run.add_argument(
        "--liveness", metavar="URL", default=None,
        help="serve kopf's liveness probe here, e.g. http://0.0.0.0:8081/healthz (the Helm chart's probes use it)",
    )  # fmt: skip
    run.set_defaults(func=_run)

    render = commands.add_parser(
        "render",
        help="print every object the operator would create for the VLLMModels in FILE (no cluster needed)",
        description="Print as YAML every object the operator would create, using the live operator's builders.",
    )
    render.add_argument(
        "-f", "--filename", action="append", required=True, metavar="FILE|DIR",
        help="a YAML file (multi-document), a directory of them, or '-' for stdin; repeatable",
    )  # fmt: skip
    render.add_argument(
        "--namespace", default="default", help="namespace for VLLMModels that name none (default: default)"
    )
    render.set_defaults(func=_render)

    crd_cmd = commands.add_parser("crd", help="print the VLLMModel CustomResourceDefinition")
    crd_cmd.set_defaults(func=_crd)
    return parser


def _run(args: argparse.Namespace) -> int:
    config = Config.from_env()
    namespaces: tuple[str, ...] = () if args.all_namespaces else (tuple(args.namespace) or config.namespaces)
    # Imported here: rendering and printing the CRD need neither kopf nor a cluster.
    runner = importlib.import_module("vllm_operator.runner")
    result = runner.run(config, namespaces, liveness_endpoint=args.liveness)
    return int(result or 0)


def _render(args: argparse.Namespace) -> int:
    try:
        config = Config.from_env()
        output = to_yaml(render_paths(args.filename, config, namespace=args.namespace))
    except (RenderError, ValueError) as exc:
        print(f"vllm-operator render: {exc}", file=sys.stderr)
        return 1
    if not output:
        print("vllm-operator render: no VLLMModel found in the input", file=sys.stderr)
        return 1
    sys.stdout.write(output)
    return 0


def _crd(args: argparse.Namespace) -> int:
    del args
    sys.stdout.write(crd.crd_text())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
