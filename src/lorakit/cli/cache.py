"""`lorakit cache`: what lorakit keeps in its cache and which of it is stale (`lorakit.model_cache`)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from lorakit.cliargs import non_negative
from lorakit.errors import ConfigError


def configure_cache(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "action",
        nargs="?",
        choices=["list", "clean"],
        default="list",
        help="list (default): every entry and whether it is stale; clean: remove the stale entries",
    )
    p.add_argument("--cache-dir", help="the cache (default: $LORAKIT_CACHE, else ~/.cache/lorakit)")
    p.add_argument("--dry-run", action="store_true", help="clean: say what would go, remove nothing")
    p.add_argument(
        "--unused-days",
        type=non_negative,
        metavar="N",
        help="clean: also remove converted models that no command used for N days",
    )
    p.add_argument(
        "--all", action="store_true", help="clean: remove everything (converted again, rebuilt on demand)"
    )
    p.add_argument("--json", action="store_true", help="print the entries as JSON")


def cmd_cache(args: argparse.Namespace) -> int:
    from lorakit.envflags import cache_root
    from lorakit.model_cache import clean, entries

    root = cache_root(args.cache_dir)
    if args.action == "list":
        if args.unused_days is not None or args.all or args.dry_run:
            raise ConfigError("--unused-days, --all and --dry-run go with `lorakit cache clean`")
        rows = entries(root)
        if args.json:
            print(json.dumps([e.as_json() for e in rows], indent=1))
            return 0
        print(f"lorakit cache: {root}")
        _table(rows, root)
        stale = [e for e in rows if e.stale]
        if stale:
            print(
                f"{len(stale)} stale, {_size(sum(e.size_bytes for e in stale))}: `lorakit cache clean` removes them"
            )
        return 0
    gone = clean(root, unused_days=args.unused_days, everything=args.all, dry_run=args.dry_run)
    if args.json:
        print(json.dumps([e.as_json() for e in gone], indent=1))
        return 0
    _table(gone, root)
    verb = "would remove" if args.dry_run else "removed"
    print(f"lorakit cache: {verb} {len(gone)} entries, {_size(sum(e.size_bytes for e in gone))}, from {root}")
    return 0


def _table(rows: list, root: Path) -> None:
    if not rows:
        print("(nothing)")
        return
    print(f"{'kind':<9} {'size':>9}  {'last used':<16}  {'path':<50}  status")
    for e in rows:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used)) if e.last_used else "?"
        status = (
            f"stale: {e.stale}" if e.stale else (f"in use by {', '.join(e.sources)}" if e.sources else "kept")
        )
        print(
            f"{e.kind:<9} {_size(e.size_bytes):>9}  {used:<16}  {str(e.path.relative_to(root)):<50}  {status}"
        )


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
