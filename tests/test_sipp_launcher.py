"""sipha.sipp, the SIPp launcher: a run that went well leaves nothing
behind; one that did not keeps SIPp's error log where it says."""
from __future__ import annotations

import asyncio
import os
import shutil

import pytest

from sipha.sipp import Sipp, free_port

pytestmark = pytest.mark.e2e


def run_against(tmp_path, uas_scenario: str, host: str = "127.0.0.1"):
    async def go():
        port = free_port()
        uas = Sipp(uas_scenario, local=(host, port), auto_answer=True, workdir=str(tmp_path))
        await uas.start()
        try:
            uac = Sipp("uac", target=(host, port), local=(host, free_port()), calls=5, rate=50)
            return uac, await uac.run(30)
        finally:
            await uas.stop(0.5)
    return asyncio.run(go())


def test_a_clean_run_removes_its_own_directory(tmp_path):
    uac, result = run_against(tmp_path, "uas")
    assert result.ok == 5 and result.failed == 0
    assert not os.path.exists(uac.workdir)
    assert os.listdir(tmp_path)          # a directory the caller gave is the caller's


def test_a_failed_run_keeps_the_error_log(tmp_path):
    uac, result = run_against(tmp_path, "uas_busy")     # 486 to every call: SIPp's uac fails them
    try:
        assert result.failed == 5
        assert os.path.isfile(uac.log_file) and os.path.getsize(uac.log_file) > 0
    finally:
        shutil.rmtree(uac.workdir, ignore_errors=True)


def test_a_target_at_an_ipv6_address_is_written_in_brackets(tmp_path):
    """SIPp read `::1:5060` as a host name and exited ("Unknown remote
    host"): `sipha load --target [::1]:5060` could not run."""
    uac, result = run_against(tmp_path, "uas", "::1")
    assert "[::1]:" in " ".join(uac.command())
    assert result.ok == 5 and result.failed == 0, result.log_tail
