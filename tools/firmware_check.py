"""Compile and type-check the firmware the way each board will see it.

    python -m tools.firmware_check compile [--root firmware] [--out build/mpy] [--json]
    python -m tools.firmware_check typecheck [--root firmware] [--board esp32|rp2]

compile: every .py under the firmware tree goes through mpy-cross once per
target architecture (xtensawin for the ESP32, armv6m for the RP2040) into
OUT/<arch>/ mirroring the tree. A file that does not compile is reported with
the compiler's own message and the command exits 1. The per-architecture
totals are the bytes a board has to hold (boot.py/main.py stay source on a
board, but are compiled here as well so a syntax error is caught).

typecheck: pyright checks the tree once per board against that board's
MicroPython stubs and nothing else: the board's stubs are both the typeshed
(so `time`, `struct`, `asyncio` are MicroPython's) and the stub path, and
pyright gets an empty environment instead of the project's venv, whose
site-packages hold a mix of both boards' stubs and CPython's libraries.
Files that belong to one board (BOARDS[...].own) are only checked in that
board's run; everything else is checked in every run. Errors and warnings
fail the command. One check runs beside pyright because pyright cannot make
it: the stubs carry `typing`, `abc`, `__future__` and friends so that the
checker works, but no board has them, so importing one outside a
`try: ... except ImportError:` (or `if TYPE_CHECKING:`) block is reported.

The pinned pyright lives in tools/typecheck/package.json (npm), the pinned
stubs in tools/typecheck/stubs-<board>.txt; `make typecheck-deps` installs
them (node_modules under tools/typecheck, stubs under build/stubs/<board>).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from tools import runtime

TYPECHECK_DIR = runtime.REPO / "tools" / "typecheck"
STUBS_DIR = runtime.REPO / "build" / "stubs"
DEFAULT_OUT = runtime.REPO / "build" / "mpy"
INSTALL_HINT = "run `make typecheck-deps`"

# MicroPython parses annotations but never evaluates them, so modern
# annotation syntax is harmless on the board; a newer language level only
# keeps pyright from flagging it. Syntax MicroPython lacks is caught by
# mpy-cross in `compile`.
PYTHON_VERSION = "3.12"


@dataclass(frozen=True)
class Board:
    name: str
    arch: str
    requirements: Path
    # Paths relative to the firmware root that only run on this board.
    own: tuple[str, ...]

    @property
    def stubs(self) -> Path:
        return STUBS_DIR / self.name


BOARDS = {
    "esp32": Board("esp32", "xtensawin", TYPECHECK_DIR / "stubs-esp32.txt",
                   ("meter/boards/esp32.py",)),
    "rp2": Board("rp2", "armv6m", TYPECHECK_DIR / "stubs-rp2.txt",
                 ("meter/boards/pico.py",)),
}
ARCHS = tuple(b.arch for b in BOARDS.values())  # ("xtensawin", "armv6m")


class SetupError(RuntimeError):
    """A tool or stub set is missing or not the pinned version."""


def firmware_files(root: Path) -> list[Path]:
    """Every .py under root, relative to it, in a stable order."""
    root = Path(root)
    if not root.is_dir():
        raise SetupError(f"firmware root {root} is not a directory")
    return sorted(p.relative_to(root) for p in root.rglob("*.py")
                  if "__pycache__" not in p.parts
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


# ---------------------------------------------------------------- compile

@dataclass
class CompileError:
    file: str
    arch: str
    message: str


@dataclass
class CompileResult:
    files: int = 0
    bytes: dict[str, int] = field(default_factory=dict)
    errors: list[CompileError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_dict(self) -> dict:
        d: dict = dict(self.bytes)
        d["files"] = self.files
        d["errors"] = [e.__dict__ for e in self.errors]
        return d


def _compile_one(root: Path, rel: Path, out: Path, arch: str) -> tuple[int, CompileError | None]:
    target = out / arch / rel.with_suffix(".mpy")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compiling from the root with a relative name keeps build paths out of the
    # .mpy (tracebacks on the board name meter/x.py) and names the file the
    # same way in error messages.
    res = subprocess.run([runtime.mpy_cross(), f"-march={arch}", "-o", str(target), str(rel)],
                         cwd=root, capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        target.unlink(missing_ok=True)
        msg = (res.stderr + res.stdout).strip() or f"mpy-cross exited {res.returncode}"
        return 0, CompileError(str(rel), arch, msg)
    return target.stat().st_size, None


def compile_tree(root: Path = runtime.FIRMWARE, out: Path = DEFAULT_OUT,
                 archs: tuple[str, ...] = ARCHS) -> CompileResult:
    root, out = Path(root), Path(out)
    files = firmware_files(root)
    result = CompileResult(files=len(files), bytes={a: 0 for a in archs})
    jobs = [(rel, arch) for arch in archs for rel in files]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        done = list(pool.map(lambda j: _compile_one(root, j[0], out, j[1]), jobs))
    for (rel, arch), (size, err) in zip(jobs, done):
        result.bytes[arch] += size
        if err:
            result.errors.append(err)
    # A module deleted from the tree must not linger in the image.
    for arch in archs:
        wanted = {out / arch / rel.with_suffix(".mpy") for rel in files}
        for stale in (out / arch).rglob("*.mpy"):
            if stale not in wanted:
                stale.unlink()
    return result


# ---------------------------------------------------------------- typecheck

@dataclass
class Diagnostic:
    board: str
    file: str
    line: int  # 1-based
    column: int  # 1-based
    severity: str
    message: str
    rule: str

    def __str__(self) -> str:
        rule = f" [{self.rule}]" if self.rule else ""
        # pyright continues long messages on indented lines; one line per
        # diagnostic keeps the output greppable.
        msg = "; ".join(part.strip() for part in self.message.splitlines() if part.strip())
        return f"{self.board}: {self.file}:{self.line}:{self.column}: {self.severity}: {msg}{rule}"


@dataclass
class BoardResult:
    board: str
    files: list[str]
    diagnostics: list[Diagnostic]

    @property
    def ok(self) -> bool:
        return not self.diagnostics


def _pinned(requirements: Path) -> list[tuple[str, str]]:
    pins = []
    for line in requirements.read_text().splitlines():
        m = re.match(r"\s*([A-Za-z0-9_.-]+)==([^\s\\;]+)", line)
        if m:
            pins.append((m.group(1), m.group(2)))
    if not pins:
        raise SetupError(f"{requirements} pins no package")
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def check_stubs(board: Board) -> Path:
    """The board's stub directory, after checking it holds exactly the pinned
    distributions."""
    if not board.stubs.is_dir():
        raise SetupError(f"{board.name} stubs not installed at {board.stubs}; {INSTALL_HINT}")
    present = {_norm(d.name[: -len(".dist-info")]) for d in board.stubs.glob("*.dist-info")}
    for name, version in _pinned(board.requirements):
        if _norm(f"{name}-{version}") not in present:
            raise SetupError(f"{board.stubs} does not hold {name}=={version} "
                             f"(found: {', '.join(sorted(present)) or 'nothing'}); {INSTALL_HINT}")
    return board.stubs


def pyright_command() -> list[str]:
    """node + the pinned pyright, checked against tools/typecheck/package.json."""
    node = shutil.which("node")
    if not node:
        raise SetupError("node not found on PATH; pyright needs Node.js")
    wanted = json.loads((TYPECHECK_DIR / "package.json").read_text())["dependencies"]["pyright"]
    pkg = TYPECHECK_DIR / "node_modules" / "pyright"
    try:
        have = json.loads((pkg / "package.json").read_text())["version"]
    except FileNotFoundError:
        raise SetupError(f"pyright not installed under {TYPECHECK_DIR}; {INSTALL_HINT}") from None
    if have != wanted:
        raise SetupError(f"pyright {have} installed, {wanted} pinned; {INSTALL_HINT}")
    return [node, str(pkg / "index.js")]


def board_files(root: Path, board: Board) -> list[Path]:
    others = {p for b in BOARDS.values() if b is not board for p in b.own}
    return [rel for rel in firmware_files(root) if rel.as_posix() not in others]


def _pyright_config(root: Path, files: list[Path], stubs: Path, workdir: Path) -> Path:
    # Paths in a pyright config must be relative to the config file.
    def rel(p: Path) -> str:
        return os.path.relpath(p, workdir)

    # An empty venv replaces the interpreter pyright would otherwise ask for
    # search paths (CPython's stdlib and the project's site-packages).
    (workdir / "env" / "empty" / "lib" / f"python{PYTHON_VERSION}" / "site-packages").mkdir(parents=True)
    config = {
        "include": [rel(root / f) for f in files],
        "extraPaths": [rel(root)],
        "typeshedPath": rel(stubs),
        "stubPath": rel(stubs),
        "venvPath": "env",
        "venv": "empty",
        "pythonVersion": PYTHON_VERSION,
        "pythonPlatform": "Linux",
        "typeCheckingMode": "standard",
        # Stub-only packages: there is no source to find, by design.
        "reportMissingModuleSource": "none",
    }
    path = workdir / "pyrightconfig.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def typecheck_board(root: Path, board: Board) -> BoardResult:
    root = Path(root).resolve()
    stubs = check_stubs(board).resolve()
    cmd = pyright_command()
    files = board_files(root, board)
    if not files:
        return BoardResult(board.name, [], [])
    with tempfile.TemporaryDirectory(prefix=f"typecheck-{board.name}-") as tmp:
        workdir = Path(tmp)
        config = _pyright_config(root, files, stubs, workdir)
        res = subprocess.run(cmd + ["-p", str(config), "--outputjson"], cwd=workdir,
                             capture_output=True, text=True, timeout=300)
    # 0: clean, 1: diagnostics reported; anything else is pyright failing to run.
    try:
        report = json.loads(res.stdout) if res.returncode in (0, 1) else None
    except json.JSONDecodeError:
        report = None
    if report is None:
        raise SetupError(f"pyright failed for {board.name} (exit {res.returncode}):\n"
                         f"{res.stdout.strip()}\n{res.stderr.strip()}")
    diags = []
    for d in report.get("generalDiagnostics", []):
        if d.get("severity") not in ("error", "warning"):
            continue
        path = Path(d.get("file", "?"))
        try:
            shown = path.resolve().relative_to(root).as_posix()
        except ValueError:
            shown = str(path)
        start = d.get("range", {}).get("start", {})
        diags.append(Diagnostic(board.name, shown, start.get("line", 0) + 1,
                                start.get("character", 0) + 1, d["severity"],
                                d.get("message", ""), d.get("rule", "")))
    return BoardResult(board.name, [f.as_posix() for f in files], diags)


# Modules the stubs carry so the type checker works (typeshed helpers, pieces
# of CPython's stdlib) that no MicroPython board has: importing one at run
# time is an ImportError on the device that pyright cannot see.
TYPING_ONLY = frozenset({"__future__", "_typeshed", "abc", "enum", "mypy_extensions",
                         "types", "typing", "typing_extensions"})


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(n, ast.Name) and n.id in ("ImportError", "Exception") for n in names)


class _RuntimeImports(ast.NodeVisitor):
    def __init__(self, rel: str):
        self.rel = rel
        self.guarded = 0
        self.found: list[Diagnostic] = []

    def _visit_guarded(self, guarded_body: Sequence[ast.AST], rest: Sequence[ast.AST]) -> None:
        self.guarded += 1
        for node in guarded_body:
            self.visit(node)
        self.guarded -= 1
        for node in rest:
            self.visit(node)

    def visit_Try(self, node: ast.Try) -> None:
        if any(_catches_import_error(h) for h in node.handlers):
            self._visit_guarded(node.body, [*node.handlers, *node.orelse, *node.finalbody])
        else:
            self.generic_visit(node)

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
                (isinstance(test, ast.Constant) and test.value is False):
            self._visit_guarded(node.body, node.orelse)
        else:
            self.generic_visit(node)

    def _check(self, node: ast.Import | ast.ImportFrom, module: str) -> None:
        top = module.split(".")[0]
        if top in TYPING_ONLY and not self.guarded:
            self.found.append(Diagnostic(
                "imports", self.rel, node.lineno, node.col_offset + 1, "error",
                f'"{module}" does not exist on MicroPython boards (only in the type stubs); '
                "import it inside try/except ImportError or drop it", "runtime-import"))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._check(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module:
            self._check(node, node.module)


def runtime_import_problems(root: Path) -> list[Diagnostic]:
    """Imports of TYPING_ONLY modules that would run on the board."""
    found = []
    for rel in firmware_files(root):
        try:
            tree = ast.parse((Path(root) / rel).read_text(), filename=str(rel))
        except (SyntaxError, ValueError):
            continue  # pyright and mpy-cross report these with more context
        visitor = _RuntimeImports(rel.as_posix())
        visitor.visit(tree)
        found.extend(visitor.found)
    return found


def typecheck(root: Path = runtime.FIRMWARE, boards: tuple[str, ...] = tuple(BOARDS)) -> list[BoardResult]:
    """One result per board, then one ("imports") for the board-independent
    import check."""
    # One pyright per board, side by side: each is single-threaded.
    with ThreadPoolExecutor(max_workers=len(boards) or 1) as pool:
        results = list(pool.map(lambda b: typecheck_board(root, BOARDS[b]), boards))
    files = [f.as_posix() for f in firmware_files(root)]
    results.append(BoardResult("imports", files, runtime_import_problems(root)))
    return results


# ---------------------------------------------------------------- CLI

def _cmd_compile(args) -> int:
    result = compile_tree(Path(args.root), Path(args.out))
    for err in result.errors:
        print(f"FAIL {err.arch} {err.file}:\n{err.message}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        for arch, total in result.bytes.items():
            print(f"{arch}: {total} bytes in {result.files} files -> {Path(args.out) / arch}")
    if not result.ok:
        print(f"{len(result.errors)} compile error(s)", file=sys.stderr)
        return 1
    return 0


def _cmd_typecheck(args) -> int:
    boards = (args.board,) if args.board else tuple(BOARDS)
    results = typecheck(Path(args.root), boards)
    # A problem in shared code shows up in every board's run: print it once,
    # naming the boards that see it.
    seen: dict[tuple, list[str]] = {}
    for result in results:
        for d in result.diagnostics:
            key = (d.file, d.line, d.column, d.severity, d.message, d.rule)
            seen.setdefault(key, []).append(d.board)
    for (file, line, col, sev, msg, rule), where in seen.items():
        print(Diagnostic("+".join(where), file, line, col, sev, msg, rule))
    for result in results:
        n_err = sum(d.severity == "error" for d in result.diagnostics)
        n_warn = len(result.diagnostics) - n_err
        print(f"{result.board}: {len(result.files)} files, {n_err} errors, {n_warn} warnings")
    return 0 if all(r.ok for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.firmware_check", description=(__doc__ or "").splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compile", help="mpy-cross every firmware file for each target architecture")
    c.add_argument("--root", default=str(runtime.FIRMWARE), help="firmware tree (default: firmware/)")
    c.add_argument("--out", default=str(DEFAULT_OUT), help="output directory (default: build/mpy)")
    c.add_argument("--json", action="store_true", help="print totals as JSON")
    t = sub.add_parser("typecheck", help="pyright against each board's MicroPython stubs")
    t.add_argument("--root", default=str(runtime.FIRMWARE), help="firmware tree (default: firmware/)")
    t.add_argument("--board", choices=sorted(BOARDS), help="check one board only")
    args = ap.parse_args(argv)
    try:
        return _cmd_compile(args) if args.cmd == "compile" else _cmd_typecheck(args)
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
