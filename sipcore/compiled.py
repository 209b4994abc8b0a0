"""Compiled copies of the hot modules, used only while they match the source.

`sipha compile` (sipha/compiler.py) turns the modules of COMPILED into C
extensions with Cython, unchanged: the same source, the same behaviour,
about a fifth less CPU a message on the proxy. It writes them, with the
SHA-256 of each source file, under `.compiled/` beside the packages (or
SIPHA_COMPILED).

`install()` (run by `import sipcore`, before any of those modules is
imported) puts a finder first on sys.meta_path that loads a module's
compiled copy only when its source file still hashes to what was compiled:
an edited module runs as Python (and `stale()` names it) until the next
`sipha compile`, so a stale build never runs old code. Where nothing was
compiled, or with SIPHA_COMPILED=off, every module runs as Python.

Standard library only, as the rest of sipcore.
"""
from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from pathlib import Path

# The modules every SIP message through the proxy goes through; the nodes
# share those of sipcore. The nodes' own modules are not compiled: they
# ran 10-15 % less CPU a call in bench/node_loop.py, but double the
# compile every install and CI run pays, and under SIPp a node's CPU a
# call moved within the box's noise. sipcore.compiled itself must import
# first.
COMPILED = (
    "sipcore.headers", "sipcore.message", "sipcore.bekey", "sipcore.logfmt", "sipcore.stats",
    "sipcore.overload", "sipcore.transport",
    "proxy.fastpath", "proxy.server", "proxy.relay", "proxy.limits",
)
MANIFEST = "manifest.json"
EXT_SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]     # e.g. .cpython-311-x86_64-linux-gnu.so
ROOT = Path(__file__).resolve().parent.parent               # the folder holding sipcore/, proxy/, node/


def directory() -> Path | None:
    """Where the compiled modules are (SIPHA_COMPILED, else .compiled/
    beside the packages); None when SIPHA_COMPILED is off, 0 or no."""
    value = os.environ.get("SIPHA_COMPILED", "")
    if value.lower() in ("off", "0", "no", "false"):
        return None
    return Path(value) if value else ROOT / ".compiled"


def source_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_manifest(where: Path | None) -> dict[str, str]:
    """{module: SHA-256 of the source it was compiled from}, for this
    interpreter's extension suffix; {} when there is none or it does not
    load, or `where` is None (off)."""
    if where is None:
        return {}
    try:
        data = json.loads((where / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("ext_suffix") != EXT_SUFFIX or not isinstance(data.get("modules"), dict):
        return {}
    return {str(k): str(v) for k, v in data["modules"].items()}


def binary_of(where: Path, module: str) -> Path:
    """Where `sipha compile` puts `module`'s compiled copy under `where`."""
    return where / (module.replace(".", "/") + EXT_SUFFIX)


def is_fresh(where: Path, module: str, digest: str | None, source: str | Path | None) -> bool:
    """Whether `module`'s copy under `where` was compiled from `source` as
    it is now (`digest`: what the manifest says it was compiled from)."""
    try:
        return (digest is not None and source is not None and str(source).endswith(".py")
                and source_digest(source) == digest and binary_of(where, module).is_file())
    except OSError:
        return False


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, where: Path, modules: dict[str, str]):
        self.where = where
        self.modules = modules
        self.loaded: list[str] = []
        self.stale: list[str] = []

    def find_spec(self, fullname, path, target=None):
        digest = self.modules.get(fullname)
        if digest is None:
            return None
        source = importlib.machinery.PathFinder.find_spec(fullname, path)
        if source is None or not is_fresh(self.where, fullname, digest, source.origin):
            self.stale.append(fullname)
            return None         # the next finder: the .py, as always
        binary = binary_of(self.where, fullname)
        return importlib.util.spec_from_file_location(fullname, binary, loader=_Loader(self, source, binary))


class _Loader(importlib.machinery.ExtensionFileLoader):
    """The compiled copy; the source, as the next finder would load it, if
    the copy does not load (a damaged or foreign file): never a process
    that cannot start because of it."""

    def __init__(self, finder: _Finder, source, binary: Path):
        super().__init__(source.name, str(binary))
        self.finder = finder
        self.source = source
        self.failed = False

    def create_module(self, spec):
        try:
            module = super().create_module(spec)
        except ImportError:
            self.failed = True
            self.finder.stale.append(spec.name)
            return None         # a plain module, which exec_module fills from the source
        self.finder.loaded.append(spec.name)
        return module

    def exec_module(self, module):
        if not self.failed:
            return super().exec_module(module)
        module.__file__ = self.source.origin
        module.__cached__ = self.source.cached
        self.source.loader.exec_module(module)


_finder: _Finder | None = None


def install() -> None:
    """Load compiled modules from now on where they match their source
    (once; does nothing where none were compiled)."""
    global _finder
    if _finder is not None:
        return
    where = directory()
    modules = read_manifest(where)
    _finder = _Finder(where or ROOT, modules)
    if modules:
        sys.meta_path.insert(0, _finder)


def loaded() -> list[str]:
    """The modules imported so far from their compiled copy."""
    return list(_finder.loaded) if _finder else []


def stale() -> list[str]:
    """The modules imported so far as Python although compiled: their
    source changed since `sipha compile`, or the copy is missing or does
    not load."""
    return list(_finder.stale) if _finder else []


def view() -> dict:
    """For /status: how many modules run compiled, and which run as Python
    although compiled."""
    return {"modules": len(loaded()), "as_python": stale()}


def is_compiled(module) -> bool:
    return getattr(module, "__file__", "").endswith(EXT_SUFFIX)


def warn_stale(log) -> None:
    """A warning line naming the modules that run as Python although
    compiled, if any (a process's start)."""
    if stale():
        import logging

        from .logfmt import event   # here, not above: logfmt is one of the modules this loads
        event(log, "compiled_stale", logging.WARNING, modules=",".join(stale()),
              msg="edited since sipha compile (or their copy does not load): these run as Python, "
                  "slower, until the next sipha compile")
