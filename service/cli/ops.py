"""The operator's subcommands of `gatekeeper`: `audit` (list and filter the decision log) and
`keys` (make an API key and the configuration that admits it)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path


def _audit(args: argparse.Namespace) -> int:
    from service.ops.audit import AuditQuery, read_decisions
    from service.settings import load_settings

    path: Path = args.path or load_settings(args.config).audit.path
    query = AuditQuery(
        request_id=args.request_id,
        decision=args.decision,
        tier=args.tier,
        api_key_id=args.key,
        degraded=args.degraded,
        reason=args.reason,
        since=args.since,
        limit=args.limit,
    )
    records = read_decisions(path, query)
    if args.json:
        for record in records:
            print(json.dumps(asdict(record), ensure_ascii=False))
        return 0
    print(
        f"{'time (UTC)':<24} {'request id':<32} {'decision':<9} {'tier':<6} "
        f"{'reason':<18} {'total ms':>9} {'key':<12} evidence"
    )
    for r in records:
        print(
            f"{r.ts[:23]:<24} {r.request_id[:32]:<32} {r.decision:<9} {r.tier or '-':<6} "
            f"{r.reason or '-':<18} {r.total_ms:>9.1f} {r.api_key_id or '-':<12} "
            f"{','.join(r.evidence_ids) or '-'}"
        )
    return 0


def _keys(args: argparse.Namespace) -> int:
    from service.ops.auth import new_token, token_sha256

    token = new_token()
    digest = token_sha256(token)
    print(f"token:   {token}")
    print("         give it to the caller; only its hash goes into the configuration")
    if args.metrics:
        print(f"env:     GATEKEEPER_AUTH__METRICS_KEY_SHA256={digest}")
        print(f'toml:    [auth]\n         metrics_key_sha256 = "{digest}"')
    else:
        print(f'env:     GATEKEEPER_AUTH__API_KEYS=\'{{"{args.key_id}": "{digest}"}}\'')
        print(f'toml:    [auth.api_keys]\n         "{args.key_id}" = "{digest}"')
    return 0


def add_ops_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = sub.add_parser("audit", help="list and filter the decision log, newest first")
    audit.add_argument("--path", type=Path, help="the log (default: settings audit.path)")
    audit.add_argument("--request-id")
    audit.add_argument("--decision", choices=["allow", "deny", "revise", "escalate"])
    audit.add_argument("--tier")
    audit.add_argument("--key", help="API key id")
    audit.add_argument("--reason", help="degraded reason, e.g. deadline")
    degraded = audit.add_mutually_exclusive_group()
    degraded.add_argument("--degraded", action="store_true", default=None)
    degraded.add_argument("--not-degraded", dest="degraded", action="store_false")
    audit.add_argument("--since", help="ISO 8601 time, UTC unless it says otherwise")
    audit.add_argument("--limit", type=int, default=50)
    audit.add_argument("--json", action="store_true", help="one JSON object per line")
    audit.set_defaults(func=_audit)

    keys = sub.add_parser("keys", help="make a new API key and print its configuration")
    keys.add_argument("action", choices=["new"])
    keys.add_argument("key_id", nargs="?", default="agent", help="the key's id (in the log)")
    keys.add_argument("--metrics", action="store_true", help="a key for /metrics instead")
    keys.set_defaults(func=_keys)
