"""Compiled modules (sipcore/compiled.py, `sipha compile`): a compiled copy
runs only while its source is unchanged, a bad build is a clear error, the
checkout under test runs the copies .ci/install built, and the byte paths
give the same answers as Python."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sipcore import compiled
from sipha.cluster import ClusterError
from sipha.compiler import build

REPO = Path(__file__).resolve().parent.parent

PROBE = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from sipcore import compiled
finder = compiled._Finder(Path(sys.argv[2]), compiled.read_manifest(Path(sys.argv[2])))
sys.meta_path.insert(0, finder)
import hotpkg.hot
print(json.dumps([hotpkg.hot.answer(), compiled.is_compiled(hotpkg.hot), finder.loaded, finder.stale]))
"""


def run(*args, env=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, cwd=REPO, env={**os.environ, **(env or {})})


def probe(root: Path, where: Path) -> list:
    r = run("-c", PROBE, str(root), str(where))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def hot_package(root: Path) -> Path:
    """hotpkg/hot.py under `root`, its answer() 42. -> that file."""
    pkg = root / "hotpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "hot.py").write_text("def answer():\n    return 42\n")
    return pkg / "hot.py"


def test_a_compiled_copy_runs_only_while_its_source_is_unchanged(tmp_path):
    hot = hot_package(tmp_path)
    where = tmp_path / "out"
    digests = build(where, ("hotpkg.hot",), jobs=1, root=tmp_path)
    assert set(digests) == {"hotpkg.hot"}
    assert list(where.glob("*build*")) == [] and list(tmp_path.glob(".compiled-build-*")) == []

    assert probe(tmp_path, where) == [42, True, ["hotpkg.hot"], []]

    hot.write_text("def answer():\n    return 43\n")      # edited, not compiled again
    assert probe(tmp_path, where) == [43, False, [], ["hotpkg.hot"]]

    build(where, ("hotpkg.hot",), jobs=1, root=tmp_path)                 # compiled again: replaces the old copy
    assert probe(tmp_path, where) == [43, True, ["hotpkg.hot"], []]


def test_a_manifest_of_another_interpreter_or_garbage_loads_nothing(tmp_path):
    (tmp_path / compiled.MANIFEST).write_text(json.dumps({"ext_suffix": ".cpython-39-x.so", "modules": {"a": "b"}}))
    assert compiled.read_manifest(tmp_path) == {}
    (tmp_path / compiled.MANIFEST).write_text("{not json")
    assert compiled.read_manifest(tmp_path) == {}
    (tmp_path / compiled.MANIFEST).write_text(json.dumps({"ext_suffix": compiled.EXT_SUFFIX, "modules": {"a": "b"}}))
    assert compiled.read_manifest(tmp_path) == {"a": "b"}


def test_a_module_that_does_not_compile_is_a_clear_error_and_keeps_the_old_build(tmp_path):
    hot = hot_package(tmp_path)
    where = tmp_path / "out"
    build(where, ("hotpkg.hot",), jobs=1, root=tmp_path)
    hot.write_text("def answer(:\n    return 43\n")
    with pytest.raises(ClusterError, match=r"compiling failed(.|\n)*Expected"):
        build(where, ("hotpkg.hot",), jobs=1, root=tmp_path)
    assert compiled.read_manifest(where)       # the old build is still there, and its source no longer matches
    assert list(tmp_path.glob(".compiled-build-*")) == []


def test_bad_options_are_named():
    r = run("-m", "sipha.cli", "compile", "--jobs", "0")
    assert r.returncode == 2 and "--jobs" in r.stderr
    r = run("-m", "sipha.cli", "compile", "--check", env={"SIPHA_COMPILED": "off"})
    assert r.returncode == 1 and "off" in r.stdout


def test_this_checkout_runs_the_modules_it_compiled():
    """.ci/install compiles them; CI must then test the compiled copies,
    every one of them, not Python left over from a failed build."""
    if not compiled.read_manifest(compiled.directory()) and not os.environ.get("CI"):
        pytest.skip("sipha compile has not run in this checkout")
    r = run("-m", "sipha.cli", "compile", "--check")
    assert r.returncode == 0, r.stdout
    r = run("-c", "import proxy.server, node.app; from sipcore import compiled; "
                  "print(' '.join(sorted(compiled.loaded())))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == sorted(compiled.COMPILED)


def test_the_byte_paths_agree_when_they_run_as_python():
    """The same tests of the parser and the proxy's byte paths, in a
    process where every module runs as Python (as where nothing was
    compiled), so that both ways stay tested."""
    r = run("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fastpath.py", "tests/test_message.py",
            "tests/test_bekey.py", env={"SIPHA_COMPILED": "off"})
    assert r.returncode == 0, r.stdout[-3000:]
    assert " passed" in r.stdout and "failed" not in r.stdout


@pytest.mark.parametrize("damage", ["source edited", "copy damaged"])
def test_a_stale_or_damaged_copy_is_named_at_start_and_the_module_runs_as_python(tmp_path, damage):
    """A module edited since `sipha compile`, or whose compiled copy does
    not load: it runs as Python, the proxy's start says so
    (compiled_stale) and counts only the copies it loaded."""
    where = compiled.directory()
    if not compiled.read_manifest(where) and not os.environ.get("CI"):
        pytest.skip("sipha compile has not run in this checkout")
    copy = tmp_path / "compiled"
    shutil.copytree(where, copy)
    if damage == "source edited":
        manifest = json.loads((copy / compiled.MANIFEST).read_text())
        manifest["modules"]["proxy.fastpath"] = "0" * 64
        (copy / compiled.MANIFEST).write_text(json.dumps(manifest))
    else:
        (copy / "proxy" / ("fastpath" + compiled.EXT_SUFFIX)).write_bytes(b"not a shared object")
    r = run("-c", "import logging, sys, proxy.server, proxy.fastpath; from sipcore import compiled; "
                  "from sipcore.logfmt import setup_logging; setup_logging('proxy', level='info', fmt='logfmt'); "
                  "compiled.warn_stale(logging.getLogger('sipha.proxy')); "
                  "print(len(compiled.loaded()), compiled.is_compiled(proxy.fastpath), file=sys.stderr); "
                  "print(proxy.fastpath.strip_top_via is not None, file=sys.stderr)",
            env={"SIPHA_COMPILED": str(copy)})
    assert r.returncode == 0, r.stderr
    assert f"{len(compiled.COMPILED) - 1} False\nTrue" in r.stderr
    assert "event=compiled_stale" in r.stderr and "modules=proxy.fastpath" in r.stderr
