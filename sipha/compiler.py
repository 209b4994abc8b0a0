"""`sipha compile`: the hot modules as C extensions (Cython), see sipcore/compiled.py."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from sipcore import compiled

from .cluster import ClusterError


def source_of(module: str, root: Path = compiled.ROOT) -> Path:
    return root / (module.replace(".", "/") + ".py")


@contextlib.contextmanager
def _cflags(flags: str):
    """CFLAGS with `flags` last, so that they win over the interpreter's
    own -O; as they were afterwards."""
    before = os.environ.get("CFLAGS")
    os.environ["CFLAGS"] = f"{before or ''} {flags}".strip()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CFLAGS", None)
        else:
            os.environ["CFLAGS"] = before


def build(where: Path, modules: tuple[str, ...] = compiled.COMPILED, jobs: int = 2, opt: int = 1,
          root: Path = compiled.ROOT) -> dict[str, str]:
    """Compile `modules` into `where` (replacing what was there once all
    are built) and write its manifest. -> {module: source SHA-256}.
    Raises ClusterError naming what is missing (Cython, a C compiler, the
    Python headers) or what failed."""
    try:
        from Cython.Build import cythonize
        from setuptools import Distribution, Extension
    except ImportError as exc:
        raise ClusterError(f"{exc.name} is not installed (pip install -e '.[fast]')") from None
    digests = {m: compiled.source_digest(source_of(m, root)) for m in modules}
    where.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".compiled-build-", dir=where.parent))
    out = work / "out"
    log = io.StringIO()
    try:
        exts = [Extension(m, [str(source_of(m, root))]) for m in modules]
        with _cflags(f"-O{opt} -w"), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            exts = cythonize(exts, build_dir=str(work / "c"), quiet=True, nthreads=jobs,
                             compiler_directives={"language_level": 3,
                                                  # annotations are hints, as in Python, not C types
                                                  "annotation_typing": False})
            dist = Distribution({"ext_modules": exts, "script_name": "sipha-compile"})
            cmd = dist.get_command_obj("build_ext")
            cmd.build_lib, cmd.build_temp, cmd.parallel = str(out), str(work / "tmp"), jobs
            cmd.ensure_finalized()
            cmd.run()
        changed = [m for m in modules if compiled.source_digest(source_of(m, root)) != digests[m]]
        if changed:
            raise ClusterError(f"{', '.join(changed)} changed while compiling; run it again")
        (out / compiled.MANIFEST).write_text(json.dumps(
            {"ext_suffix": compiled.EXT_SUFFIX, "modules": digests}, indent=1, sort_keys=True) + "\n")
        old = work / "old"
        if where.exists():
            where.rename(old)       # running processes keep the files they mapped
        out.rename(where)
        return digests
    except (Exception, SystemExit) as exc:      # distutils ends a failed compiler run with SystemExit
        if isinstance(exc, ClusterError):
            raise
        tail = "\n".join(log.getvalue().strip().splitlines()[-15:])
        hint = ("" if type(exc).__module__.startswith("Cython") else       # the source itself
                "\n(it needs a C compiler and the Python headers: apt-get install gcc python3-dev)")
        raise ClusterError(f"compiling failed: {exc}\n{tail}{hint}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(where: Path | None) -> tuple[list[str], list[str]]:
    """-> (fresh, not fresh) modules of COMPILED for `where`'s manifest."""
    digests = compiled.read_manifest(where)
    fresh, not_fresh = [], []
    for m in compiled.COMPILED:
        ok = where is not None and compiled.is_fresh(where, m, digests.get(m), source_of(m))
        (fresh if ok else not_fresh).append(m)
    return fresh, not_fresh


def cmd_compile(args) -> int:
    where = compiled.directory()
    if args.check:
        fresh, not_fresh = report(where)
        if where is None:
            print("compiled modules: off (SIPHA_COMPILED)")
            return 1
        print(f"compiled modules in {where}: {len(fresh)} of {len(compiled.COMPILED)} match their source")
        for m in not_fresh:
            print(f"  runs as Python: {m}")
        return 0 if not not_fresh else 1
    if where is None:
        raise ClusterError("SIPHA_COMPILED is off; unset it or name a directory")
    if args.jobs < 1:
        raise ClusterError(f"--jobs must be 1 or more, not {args.jobs}")
    started = time.monotonic()
    digests = build(where, jobs=args.jobs, opt=args.opt)
    print(f"compiled {len(digests)} modules into {where} in {time.monotonic() - started:.0f} s "
          f"(-O{args.opt}); edited modules run as Python until the next sipha compile")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("compile", help="compile the hot modules with Cython (the proxy: a fifth less CPU a message)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compilers at once (default: one per core)")
    p.add_argument("--opt", type=int, choices=(1, 2, 3), default=1,
                   help="the C compiler's -O level (default 1: -O2 runs 1 %% fewer instructions, compiles 1.6x as long)")
    p.add_argument("--check", action="store_true",
                   help="say which modules run compiled and which as Python (exit 1 if any as Python)")
    p.set_defaults(func=cmd_compile)

