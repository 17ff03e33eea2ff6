"""`ruvllm`: operator tasks around a ruvllm-serve deployment."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _prepare_model(args: argparse.Namespace) -> int:
    from ruvllm.builtin_models import BUILTIN_MODELS
    from ruvllm.model_store import prepare_builtin

    names = list(BUILTIN_MODELS) if args.all else [args.name]
    for name in names:
        path = prepare_builtin(name, args.cache_dir, force=args.force)
        print(path)
    return 0


def _xlora_fixture(args: argparse.Namespace) -> int:
    from ruvllm.adapters.xlora.fixture import build_fixture
    from ruvllm.model_store import prepare_builtin

    print(build_fixture(prepare_builtin(args.base, args.cache_dir), cache_dir=args.cache_dir))
    return 0


def _k8s_render(args: argparse.Namespace) -> int:
    from ruvllm.k8s import PROFILES, manifest_path, render_text

    profiles = list(PROFILES) if args.all else [args.profile]
    for profile in profiles:
        text = render_text(args.config, profile)
        if args.stdout:
            print(text)
            continue
        out = manifest_path(args.config, profile)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(out)
    if args.all and not args.stdout:
        from ruvllm.grafana import DASHBOARD_PATH, dashboard_text
        from ruvllm.k8s_network import POLICY_PATH, network_policy_text

        for path, text in ((DASHBOARD_PATH, dashboard_text()),
                           (POLICY_PATH, network_policy_text())):
            out = args.config.resolve().parent.joinpath(*path)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text)
            print(out)
    return 0


def _load_configs(path: Path) -> dict | None:
    """The ruvllm apps of a Serve config file, or None after printing why not."""
    from ruvllm.config import ConfigError
    from ruvllm.serve_config import load_app_configs

    try:
        return load_app_configs(path)
    except ConfigError as e:
        print(f"{path}: {e}", file=sys.stderr)
        return None


def _validate(args: argparse.Namespace) -> int:
    configs = _load_configs(args.config)
    if configs is None:
        return 1
    for app_name, config in configs.items():
        print(f"{args.config}: application {app_name!r} OK "
              f"(model {config.model.source}, {config.replicas.num_replicas} replica(s))")
    return 0


def _isq(args: argparse.Namespace) -> int:
    from ruvllm.isq.job import IsqQualityError, quantize, quantize_on_ray
    from ruvllm.model_store import resolve_model

    configs = _load_configs(args.config)
    if configs is None:
        return 1
    # mistral.rs variants quantize while loading: no job to run ahead of time.
    jobs = [(config, v) for config in configs.values() for v in config.quantized
            if v.isq.is_toolkit_job]
    if not jobs:
        print(f"{args.config}: no `quantized` models with a toolkit job (isq.method)",
              file=sys.stderr)
        return 1
    if args.ray_address:
        import ray

        ray.init(address=args.ray_address)
    failed = 0
    for config, variant in jobs:
        base = resolve_model(config.model.source, config.resolved_cache_dir)
        run = quantize_on_ray if args.ray_address else quantize
        try:
            result = run(base, config.model.name, variant.isq, config.resolved_cache_dir)
        except IsqQualityError as e:
            print(f"{variant.name}: {e}", file=sys.stderr)
            failed += 1
            continue
        r = result.report
        sets = "; ".join(
            f"{s['name']}{'' if s['gated'] else ' (not gated)'} perplexity "
            f"{s['perplexity']:.3f} vs {s['base_perplexity']:.3f}, "
            f"{100 * s['perplexity_increase']:+.2f}%" for s in r["evaluation"]["sets"])
        print(f"{variant.name}: {result.path} ({'cached' if result.reused else 'built'}; "
              f"{sets}; {r['bytes']['ratio']:.2f}x bf16 bytes)")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ruvllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare-model", help="build a builtin model's checkpoint in the cache")
    p.add_argument("--name", default="smollm2-135m-instruct")
    p.add_argument("--all", action="store_true", help="prepare every builtin model")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.set_defaults(func=_prepare_model)

    p = sub.add_parser("xlora-fixture",
                       help="train the small X-LoRA checkpoint used by tests and benchmarks")
    p.add_argument("--base", default="smollm2-135m-instruct")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.set_defaults(func=_xlora_fixture)

    p = sub.add_parser("k8s", help="Kubernetes (KubeRay) manifests")
    k8s = p.add_subparsers(dest="k8s_command", required=True)
    p = k8s.add_parser("render", help="render RayService manifests from a Serve config")
    p.add_argument("--config", type=Path, default=Path("cluster.yaml"))
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--profile", choices=["cpu-dev", "gpu"])
    group.add_argument("--all", action="store_true", help="every profile")
    p.add_argument("--stdout", action="store_true", help="print instead of writing k8s/overlays")
    p.set_defaults(func=_k8s_render)

    p = sub.add_parser("isq", help="run the quantization jobs of a Serve config ahead of "
                       "time (results are cached; deployments then start at once)")
    p.add_argument("config", type=Path, nargs="?", default=Path("cluster.yaml"))
    p.add_argument("--ray-address", default=None,
                   help="run each job as a Ray task on this cluster instead of in-process")
    p.set_defaults(func=_isq)

    p = sub.add_parser("validate", help="validate the ruvllm args of a Serve config file")
    p.add_argument("config", type=Path, nargs="?", default=Path("cluster.yaml"))
    p.set_defaults(func=_validate)

    args = parser.parse_args(argv)
    return args.func(args)
