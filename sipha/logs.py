"""`sipha logs`: the local cluster's proxy and node logs merged by time,
optionally narrowed to one call.

A call is known by several names across processes: the caller's Call-ID,
the B-leg Call-ID the node made, and the BEKey shared by both. `--call X`
first finds every BEKey seen with Call-ID X, then keeps each line naming
X, one of those BEKeys, or a B-leg Call-ID stamped with one of them.
"""
from __future__ import annotations

import glob
import os
import sys
import time

from sipcore.logfmt import parse_logfmt


def _log_files(directory: str) -> list[str]:
    return sorted(glob.glob(os.path.join(directory, "logs", "*.log")))


def _matches(fields: dict, line: str, call: str | None, bekeys: set[str]) -> bool:
    if call is None and not bekeys:
        return True
    if call is not None and (fields.get("call_id") == call or fields.get("b_call_id") == call):
        return True
    return any(k in line for k in bekeys)


def merged(directory: str, call: str | None = None, bekey: str | None = None) -> list[str]:
    rows = []
    for path in _log_files(directory):
        with open(path, errors="replace") as fh:
            for line in fh:
                if line.startswith("ts="):
                    rows.append((parse_logfmt(line.rstrip("\n")), line.rstrip("\n")))
    bekeys = {bekey} if bekey else set()
    if call:
        bekeys |= {f["bekey"] for f, _ in rows if f.get("call_id") == call and f.get("bekey")}
    rows.sort(key=lambda r: r[0].get("ts", ""))
    return [line for f, line in rows if _matches(f, line, call, bekeys)]


def follow(directory: str, call: str | None, bekey: str | None) -> None:
    """Print new matching lines as they are written (like tail -f over all
    the cluster's logs), following rotation."""
    positions: dict[str, tuple[int, int]] = {}
    bekeys = {bekey} if bekey else set()
    for path in _log_files(directory):
        st = os.stat(path)
        positions[path] = (st.st_ino, st.st_size)
    while True:
        batch = []
        for path in _log_files(directory):
            try:
                st = os.stat(path)
            except OSError:
                continue
            ino, pos = positions.get(path, (st.st_ino, 0))
            if st.st_ino != ino or st.st_size < pos:
                pos = 0  # rotated or truncated
            with open(path, errors="replace") as fh:
                fh.seek(pos)
                for line in fh:
                    if line.startswith("ts=") and line.endswith("\n"):
                        f = parse_logfmt(line.rstrip("\n"))
                        if call and f.get("call_id") == call and f.get("bekey"):
                            bekeys.add(f["bekey"])
                        batch.append((f.get("ts", ""), line.rstrip("\n"), f))
                positions[path] = (st.st_ino, fh.tell())
        for _, line, f in sorted(batch, key=lambda b: b[0]):
            if _matches(f, line, call, bekeys):
                print(line, flush=True)
        time.sleep(0.3)


def cmd_logs(args) -> int:
    from .cluster import ClusterError
    if not os.path.isdir(os.path.join(args.dir, "logs")):
        raise ClusterError(f"--dir: no cluster logs under {os.path.abspath(args.dir)} (run sipha up)")
    if args.follow:
        try:
            follow(args.dir, args.call, args.bekey)
        except KeyboardInterrupt:
            return 0
    lines = merged(args.dir, args.call, args.bekey)
    for line in lines:
        print(line)
    if (args.call or args.bekey) and not lines:
        print(f"no log line names {args.call or args.bekey}", file=sys.stderr)
        return 1
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("logs", help="merge the cluster's logs by time; trace one call across processes")
    p.add_argument("--dir", default=".sipha", help="the cluster's directory (default .sipha)")
    p.add_argument("--call", metavar="CALL-ID", help="only lines of this call (both legs, every node)")
    p.add_argument("--bekey", metavar="KEY", help="only lines of this BEKey")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")
    p.set_defaults(func=cmd_logs)
