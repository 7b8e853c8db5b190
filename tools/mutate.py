"""Mutation testing of curvkern against a curated list of plausible one-line bugs.

Each mutant in ``tools/mutants.toml`` names an exact snippet of the sources, its replacement, the
focused tests that should catch it, and a one-line description. A mutant is found BY TEXT: the
snippet must occur exactly once in the files its ``file`` glob matches under curvkern/ and csrc/,
so the list survives refactors that move code between files (a snippet that no longer matches is
reported, and fails the run, until the list is updated).

The mutants are applied one at a time to a scratch copy of the working tree (the files git
tracks or would track, plus the built extension), never to the checkout. Each runs its focused
tests first; only a survivor runs the whole suite (``--no-suite`` skips that pass). C++ mutants
rebuild the CPU extension in place in the scratch copy (``CURVKERN_CPU_ONLY=1 python setup.py
build_ext --inplace``); they run last, one after the other, so that the build folder is shared
and each rebuild recompiles only what changed.

    python tools/mutate.py                  # the whole list, then the score table
    python tools/mutate.py --only NAME ...  # some mutants
    python tools/mutate.py --python-only    # no C++ rebuilds
    python tools/mutate.py --list           # where each mutant applies, without running
    python tools/mutate.py --mutmut         # mutmut's generated mutants ([tool.mutmut])

The exit status is 0 when every mutant was found and killed (or is marked equivalent).
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as a package
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        message = "tools/mutate.py reads TOML: use Python >= 3.11 or pip install tomli"
        raise SystemExit(message) from None

ROOT = Path(__file__).resolve().parent.parent
SEARCHED = ("curvkern/", "csrc/")
CPP_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")
PYTEST = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]


@dataclass
class Mutant:
    name: str
    file: str  # glob of the files to search, relative to the repository root
    original: str
    replacement: str
    tests: list[str]
    description: str
    equivalent: str = ""  # why the mutant cannot change behavior ("" when it can)
    path: str = ""  # the one file holding ``original``, once located
    line: int = 0
    status: str = "not run"
    seconds: float = 0.0
    log: list[str] = field(default_factory=list)

    @property
    def is_cpp(self) -> bool:
        return self.path.endswith(CPP_SUFFIXES)


def load(path: Path) -> list[Mutant]:
    with open(path, "rb") as f:
        entries = tomllib.load(f).get("mutant", [])
    mutants, names = [], set()
    for i, entry in enumerate(entries):
        missing = {"name", "file", "original", "replacement", "tests", "description"} - set(entry)
        if missing:
            raise SystemExit(f"{path}: mutant #{i + 1} lacks {sorted(missing)}")
        if entry["name"] in names:
            raise SystemExit(f"{path}: two mutants are named {entry['name']!r}")
        if entry["original"] == entry["replacement"]:
            raise SystemExit(f"{path}: mutant {entry['name']!r} replaces its text by itself")
        names.add(entry["name"])
        mutants.append(Mutant(**entry))
    return mutants


def tree_files(root: Path) -> list[str]:
    """The files git tracks or would track (not ignored), relative to root."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=root,
        check=True,
        capture_output=True,
    ).stdout.decode()
    return sorted(p for p in out.split("\0") if p and (root / p).is_file())


def locate(mutants: list[Mutant], files: list[str]) -> None:
    """Sets each mutant's path and line, or its status when its text is not found exactly once."""
    for m in mutants:
        hits = []
        for rel in files:
            if not rel.startswith(SEARCHED) or not fnmatch.fnmatch(rel, m.file):
                continue
            text = (ROOT / rel).read_text()
            start = text.find(m.original)
            while start >= 0:
                hits.append((rel, text.count("\n", 0, start) + 1))
                start = text.find(m.original, start + 1)
        if len(hits) == 1:
            m.path, m.line = hits[0]
        elif not hits:
            m.status = "NOT FOUND"
        else:
            m.status = "AMBIGUOUS " + ", ".join(f"{p}:{n}" for p, n in hits[:3])


def make_scratch(files: list[str]) -> Path:
    """A copy of the working tree and the built extension in a new temporary folder."""
    scratch = Path(tempfile.mkdtemp(prefix="curvkern-mutants-"))
    extension = [str(p.relative_to(ROOT)) for p in (ROOT / "curvkern").glob("_C*.so")]
    for rel in files + extension:
        target = scratch / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, target)
    return scratch


def run(cmd: list[str], cwd: Path, timeout: float) -> tuple[int | None, str]:
    """(exit status or None on timeout, the output's last lines)."""
    env = dict(os.environ, PYTHONPATH=str(cwd), OMP_NUM_THREADS="1")
    env["CURVKERN_REQUIRE_KERNELS"] = "1"  # a broken build fails the tests instead of skipping
    try:
        done = subprocess.run(
            cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return None, ""
    return done.returncode, "\n".join((done.stdout + done.stderr).strip().splitlines()[-5:])


def verdict(rc: int | None) -> str | None:
    """Killed, or None when the tests passed; an error status when pytest itself failed."""
    if rc is None:
        return "killed (timeout)"
    if rc == 0:
        return None
    if rc == 1:
        return "killed"
    if rc == 2:
        return "killed (collection error)"
    return f"ERROR (pytest exit {rc})"


def test_mutant(m: Mutant, scratch: Path, args, build: bool) -> None:
    start = time.monotonic()
    source = scratch / m.path
    original = source.read_text()
    source.write_text(original.replace(m.original, m.replacement, 1))
    try:
        if build:
            rc, out = run(BUILD, scratch, args.build_timeout)
            if rc != 0:
                m.status = "BUILD FAILED"
                m.log.append(out)
                return
        focused = [t for t in m.tests if (scratch / t.split("::")[0]).exists()]
        if len(focused) < len(m.tests):
            m.log.append(f"focused tests missing: {sorted(set(m.tests) - set(focused))}")
        status = None
        if focused:
            rc, out = run(PYTEST + focused, scratch, args.timeout)
            status = verdict(rc)
            m.log.append(out)
        if status is None and not args.no_suite:
            rc, out = run(PYTEST + ["tests"], scratch, args.suite_timeout)
            status = verdict(rc)
            status = status and status.replace("killed", "killed by suite", 1)
            m.log.append(out)
        if status is None:
            status = "survived (equivalent)" if m.equivalent else "SURVIVED"
            if args.no_suite:
                status += " (focused only)"
        m.status = status
    finally:
        source.write_text(original)
        m.seconds = time.monotonic() - start


BUILD = [sys.executable, "setup.py", "build_ext", "--inplace"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutants", default=str(ROOT / "tools" / "mutants.toml"))
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    parser.add_argument("--python-only", action="store_true", help="skip the C++ mutants")
    parser.add_argument("--no-suite", action="store_true", help="no whole-suite pass")
    parser.add_argument("--list", action="store_true", help="locate the mutants and stop")
    parser.add_argument("--jobs", type=int, default=1, help="Python mutants run in parallel")
    parser.add_argument("--timeout", type=float, default=600, help="focused tests, seconds")
    parser.add_argument("--suite-timeout", type=float, default=1800)
    parser.add_argument("--build-timeout", type=float, default=1800)
    parser.add_argument("--keep", action="store_true", help="keep the scratch copies")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the test output")
    parser.add_argument(
        "--mutmut",
        action="store_true",
        help="run mutmut (its configuration: pyproject.toml [tool.mutmut]) in a scratch copy",
    )
    args = parser.parse_args()
    os.environ["CURVKERN_CPU_ONLY"] = "1"
    if args.mutmut:
        return run_mutmut(args)

    mutants = load(Path(args.mutants))
    if args.only:
        unknown = set(args.only) - {m.name for m in mutants}
        if unknown:
            raise SystemExit(f"--only: no mutant named {sorted(unknown)}")
        mutants = [m for m in mutants if m.name in args.only]
    files = tree_files(ROOT)
    locate(mutants, files)
    found = [m for m in mutants if m.path]
    if args.python_only:
        found = [m for m in found if not m.is_cpp]
        for m in mutants:
            if m.path and m.is_cpp:
                m.status = "skipped (--python-only)"
    if args.list:
        for m in mutants:
            where = f"{m.path}:{m.line}" if m.path else m.status
            print(f"{m.name:34} {where:38} {m.description}")
        return 0 if all(m.path for m in mutants) else 1

    python = [m for m in found if not m.is_cpp]
    cpp = [m for m in found if m.is_cpp]
    began = time.monotonic()
    jobs = max(1, min(args.jobs, len(python))) if python else 1
    scratches = [make_scratch(files) for _ in range(jobs)]
    try:
        queue = list(python)

        def worker(scratch: Path) -> None:
            while queue:
                try:
                    m = queue.pop(0)
                except IndexError:
                    return
                test_mutant(m, scratch, args, build=False)
                report(m, args.verbose)

        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(worker, scratches))
        if cpp:
            scratch = scratches[0]
            saved = {p: p.read_bytes() for p in (scratch / "curvkern").glob("_C*.so")}
            for m in cpp:
                test_mutant(m, scratch, args, build=True)
                for path, data in saved.items():  # the unmutated extension, for the next one
                    path.write_bytes(data)
                report(m, args.verbose)
    finally:
        if args.keep:
            print("scratch copies kept:", *scratches)
        else:
            for s in scratches:
                shutil.rmtree(s, ignore_errors=True)
    return table(mutants, time.monotonic() - began)


def run_mutmut(args) -> int:
    """mutmut in a scratch copy (its mutants/ folder stays out of the checkout); its summary."""
    if shutil.which("mutmut") is None:
        raise SystemExit("--mutmut needs mutmut: pip install mutmut")
    scratch = make_scratch(tree_files(ROOT))
    began = time.monotonic()
    try:
        subprocess.run(["git", "init", "-q", "."], cwd=scratch, check=True)
        jobs = ["--max-children", str(max(1, args.jobs))]
        # mutmut puts its mutants/ copy on the path itself; the checkout must not shadow it.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        subprocess.run(["mutmut", "run", *jobs], cwd=scratch, env=env)
        results = subprocess.run(
            ["mutmut", "results", "--all", "true"],
            cwd=scratch,
            env=env,
            capture_output=True,
            text=True,
        ).stdout
    finally:
        if args.keep:
            print("scratch copy kept:", scratch)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    counts: dict[str, int] = {}
    for line in results.splitlines():
        if ":" in line:
            status = line.rsplit(":", 1)[1].strip()
            counts[status] = counts.get(status, 0) + 1
    print()
    print(", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    checked = sum(n for status, n in counts.items() if status != "not checked")
    killed = counts.get("killed", 0) + counts.get("timeout", 0)
    if checked:
        minutes = (time.monotonic() - began) / 60
        print(f"mutmut score: {killed}/{checked} ({100.0 * killed / checked:.1f}%, survivors "
              f"include equivalent mutants), wall time {minutes:.1f} min")  # fmt: skip
    return 0


def report(m: Mutant, verbose: bool) -> None:
    print(f"  {m.name:34} {m.status:28} {m.seconds:6.1f} s", flush=True)
    if verbose or m.status.startswith(("SURVIVED", "ERROR", "BUILD")):
        for out in m.log:
            print("    | " + out.replace("\n", "\n    | "))


def table(mutants: list[Mutant], seconds: float) -> int:
    print()
    print(f"{'mutant':34} {'where':38} {'result':28} {'s':>6}")
    print("-" * 110)
    for m in mutants:
        where = f"{m.path}:{m.line}" if m.path else "-"
        print(f"{m.name:34} {where:38} {m.status:28} {m.seconds:6.1f}")
        print(f"{'':34} {m.description}")
    ran = [m for m in mutants if m.status.startswith(("killed", "SURVIVED", "survived"))]
    counted = [m for m in ran if not m.equivalent]
    killed = [m for m in counted if m.status.startswith("killed")]
    survivors = [m.name for m in counted if not m.status.startswith("killed")]
    broken = [m.name for m in mutants if m.status.startswith(("NOT FOUND", "AMBIGUOUS", "ERROR"))]
    broken += [m.name for m in mutants if m.status.startswith("BUILD")]
    print("-" * 110)
    score = 100.0 * len(killed) / len(counted) if counted else float("nan")
    print(
        f"score: {len(killed)}/{len(counted)} killed ({score:.1f}%), "
        f"{len(ran) - len(counted)} equivalent, wall time {seconds / 60:.1f} min"
    )
    if survivors:
        print("SURVIVED (a test is missing):", ", ".join(survivors))
    if broken:
        print("NOT RUN (update tools/mutants.toml or the build):", ", ".join(broken))
    return 0 if not survivors and not broken else 1


if __name__ == "__main__":
    sys.exit(main())
