"""sipha logs: merged by time across processes, one call followed by its
BEKey through both legs, and --follow printing lines as they are written."""
from __future__ import annotations

import subprocess
import sys
import time

from sipha.logs import merged

A = "ts=2026-11-25T10:00:00.100Z level=info proc=proxy event=route method=INVITE call_id=c1 bekey=k1 node=node1 reason=owner"
B = "ts=2026-11-25T10:00:00.050Z level=info proc=node1 event=dialog_created bekey=k1 call_id=c1 b_call_id=sphk1x"
C = "ts=2026-11-25T10:00:00.200Z level=info proc=proxy event=route method=INVITE call_id=sphk1x bekey=k1 reason=outbound"
D = "ts=2026-11-25T10:00:00.150Z level=info proc=proxy event=route method=INVITE call_id=other bekey=k2 reason=owner"


def cluster_dir(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "proxy.log").write_text(f"{A}\n{C}\n{D}\n")
    (logs / "node1.log").write_text(f"{B}\n")
    return tmp_path


def test_one_call_across_processes_in_time_order(tmp_path):
    d = cluster_dir(tmp_path)
    assert merged(str(d), call="c1") == [B, A, C]
    assert merged(str(d), bekey="k2") == [D]
    assert merged(str(d)) == [B, A, D, C]


def test_follow_prints_new_lines_of_the_call(tmp_path):
    d = cluster_dir(tmp_path)
    p = subprocess.Popen([sys.executable, "-m", "sipha.cli", "logs", "--dir", str(d), "--follow", "--call", "c1"],
                         stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        new = "ts=2026-11-25T10:00:01.000Z level=info proc=node1 event=dialog_terminated bekey=k1 call_id=c1"
        with open(d / "logs" / "node1.log", "a") as fh:
            fh.write("ts=2026-11-25T10:00:01.000Z level=info proc=node1 event=dialog_created bekey=k9 call_id=zz\n")
            fh.write(new + "\n")
        time.sleep(1.0)
    finally:
        p.terminate()
        out, _ = p.communicate(timeout=5)
    assert out.splitlines() == [new]
