"""`ruvllm`: operator tasks around a ruvllm-serve deployment."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _prepare_model(args: argparse.Namespace) -> int:
    from ruvllm.model_store import BUILTIN_MODELS, prepare_builtin

    names = list(BUILTIN_MODELS) if args.all else [args.name]
    for name in names:
        path = prepare_builtin(name, args.cache_dir, force=args.force)
        print(path)
    return 0


def _validate(args: argparse.Namespace) -> int:
    from ruvllm.config import ConfigError
    from ruvllm.serve_config import load_app_configs

    try:
        configs = load_app_configs(args.config)
    except ConfigError as e:
        print(f"{args.config}: {e}", file=sys.stderr)
        return 1
    for app_name, config in configs.items():
        print(f"{args.config}: application {app_name!r} OK "
              f"(model {config.model.source}, {config.replicas.num_replicas} replica(s))")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ruvllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare-model", help="build a builtin model's checkpoint in the cache")
    p.add_argument("--name", default="smollm2-135m-instruct")
    p.add_argument("--all", action="store_true", help="prepare every builtin model")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.set_defaults(func=_prepare_model)

    p = sub.add_parser("validate", help="validate the ruvllm args of a Serve config file")
    p.add_argument("config", type=Path, nargs="?", default=Path("cluster.yaml"))
    p.set_defaults(func=_validate)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
