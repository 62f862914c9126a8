"""The fuzz suite's harness (docs/fuzzing.md): runs a command of the real command line on a
generated input, in a forked child, and classifies what happened.

Every case is one :class:`Case`: the files it makes in a fresh folder, the command line, what a
correct program must do with it (``ok``, ``refuse`` or ``either``), what a refusal must name,
and how to check the outputs of a success. :meth:`Family.run` runs it and gives one outcome:

==========  =====================================================================================
ok          exit status 0, the outputs valid (the case's validator), only allowed stderr lines
refused     exit status 2 with exactly one ``error: ...`` line that names the culprit, only
            allowed stderr lines besides, and nothing left behind. ``data check`` and
            ``predict`` without ``--strict`` may name the file in their report instead (stdout,
            or the WARNING line of a skipped input), and may end with status 1 after it (what
            they did before they exited with 2)
traceback   "Traceback" in the output, or status 1 with cli.main's ``error: internal error``
hang        the case's time limit passed (the child is killed)
leftover    a temporary ``.NAME.*.tmp`` file anywhere, or, after a refusal, an output of the
            command or a new empty folder
executed    a payload ran: its marker file exists, or its canary folder is gone
silent      exit status 0 on an input that must be refused
other       anything else: a crash by a signal, another status, a refusal that names nothing,
            a stray stderr line, a refused valid input, invalid outputs of a success, a
            changed input file
==========  =====================================================================================

Allowed stderr lines besides the one ``error:`` line: logging's ``WARNING <logger>: ...`` and
``INFO <logger>: ...`` (cli.main's format), a Python warning (``FILE:LINE: NameWarning: ...``
and the source line after it, indented), and for a usage error click's ``Usage: ...`` and
``Try '... --help' for help.`` lines. Commands run with their progress bars off
(``train --no-progress``), so no other line is expected.

The child: ``os.fork()`` of the pytest process (which imported contrastseg and torch once); it
takes its own process group, one PyTorch thread, at most :data:`MEMORY_BYTES` of address space,
stdin from /dev/null, stdout and stderr into files, the case folder as working directory, a
temporary folder of its own (where ``cli.main`` writes traceback files), logging and warnings
as a fresh interpreter has them, then calls ``contrastseg.cli.main()`` exactly as the console
script does. Every ``torch`` call of the harness itself (loading checkpoints to mutate or to
compare them) also runs in a child (:func:`call_in_child`), so that the pytest process never
starts PyTorch's thread pools before a fork, and a crash while reading a broken file ends the
child, not the test run.
"""

from __future__ import annotations

import contextlib
import faulthandler
import fnmatch
import hashlib
import io
import json
import logging
import os
import pickle
import re
import resource
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, settings

ROOT = Path(__file__).resolve().parents[1]
START = os.getcwd()  # FUZZ_RECORD and FUZZ_KEEP are relative to it

#: The outcomes of a case, in the table's column order; those after ``refused`` fail the test.
OUTCOMES = ("ok", "refused", "traceback", "hang", "leftover", "executed", "silent", "other")
FAILING = OUTCOMES[2:]

#: Address space a case may use (a decompression bomb or a checkpoint claiming a huge tensor
#: then fails inside the child instead of exhausting the machine).
MEMORY_BYTES = int(float(os.environ.get("FUZZ_MEMORY_GB", "6")) * (1 << 30))

_ERROR = re.compile(r"^error: ")
_ALLOWED = (
    re.compile(r"^(WARNING|INFO) [\w.]+: "),  # cli.main's logging format
    re.compile(r"^\S.*:\d+: \w*Warning: "),  # a Python warning's first line
)
_USAGE = (re.compile(r"^Usage: "), re.compile(r"^Try '.+' for help\.$"))
_INTERNAL = "error: internal error"


# ----------------------------------------------------------------------------- settings
def examples(weight: float = 1.0) -> int:
    """The number of examples of a family: ``FUZZ_EXAMPLES`` (default 8) times its weight
    (families that train or evaluate are weighted below 1), at least 1."""
    base = float(os.environ.get("FUZZ_EXAMPLES") or 8)
    return max(1, round(base * weight))


def fuzz_settings(weight: float = 1.0) -> settings:
    """Hypothesis settings of a family: :func:`examples` many, no deadline, no example
    database, derandomised (the same cases every run; ``FUZZ_SEED=N`` draws others, see
    docs/fuzzing.md), and no shrinking unless ``FUZZ_SHRINK=1`` (each case runs a command)."""
    phases = [Phase.explicit, Phase.generate]
    if os.environ.get("FUZZ_SHRINK", "") not in ("", "0"):
        phases.append(Phase.shrink)
    return settings(
        max_examples=examples(weight),
        deadline=None,
        database=None,
        derandomize=not os.environ.get("FUZZ_SEED"),
        phases=phases,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.filter_too_much,
            HealthCheck.function_scoped_fixture,
        ],
        print_blob=True,
    )


# ----------------------------------------------------------------------------- the child
@dataclass
class Run:
    """What a child did: exit status (None when killed for its time limit), the signal that
    ended it (or 0), its stdout and stderr, its wall time, the traceback file cli.main wrote."""

    status: int | None
    signal: int
    stdout: str
    stderr: str
    seconds: float
    traceback_file: str = ""

    @property
    def hung(self) -> bool:
        return self.status is None and self.signal == 0


def _fresh_streams() -> None:
    """New sys.stdout/sys.stderr on fds 1 and 2 (the parent's objects may hold a lock taken by
    another thread at the fork, and pytest's capture replaces them)."""
    for fd, name in ((1, "stdout"), (2, "stderr")):
        stream = io.TextIOWrapper(
            io.FileIO(fd, "w", closefd=False),
            encoding="utf-8",
            errors="backslashreplace",
            line_buffering=True,
        )
        setattr(sys, name, stream)
        setattr(sys, f"__{name}__", stream)
    sys.stdin = open(os.devnull)  # noqa: SIM115 - for the rest of the child's life


def _fresh_logging_and_warnings() -> None:
    """Logging and warnings as a fresh interpreter has them: pytest's capture handlers and
    recording warning filters removed, Python's default filters back."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    for logger in logging.Logger.manager.loggerDict.values():
        if isinstance(logger, logging.Logger):
            logger.handlers.clear()
            logger.setLevel(logging.NOTSET)
            logger.propagate = True
            logger.disabled = False
    warnings.resetwarnings()
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.simplefilter("ignore", category)

    def show(msg: Any) -> None:  # what warnings._showwarnmsg_impl does
        sys.stderr.write(warnings._formatwarnmsg(msg))  # type: ignore[attr-defined]

    warnings._showwarnmsg_impl = show  # type: ignore[attr-defined]


def _child_setup(cwd: Path, aux: Path) -> None:
    os.setpgid(0, 0)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        out = os.open(aux / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    _fresh_streams()
    # pytest's faulthandler writes to its own copy of the terminal: a crash's stack goes to the
    # case's stderr instead (a crash is classified by its signal)
    faulthandler.enable(file=sys.stderr)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE, signal.SIGALRM):
        signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    tmp = aux / "tmp"
    tmp.mkdir(exist_ok=True)
    tempfile.tempdir = str(tmp)
    os.environ.update(TMPDIR=str(tmp), COLUMNS="80", NO_COLOR="1", TERM="dumb")
    os.environ.pop("CONTRASTSEG_TRACEBACK", None)
    os.chdir(cwd)
    _fresh_logging_and_warnings()
    import torch

    torch.set_num_threads(1)
    # predict --compile (and eval.compile) run eagerly in a case: what a command accepts and
    # refuses is the same, and inductor would compile for a minute or more, past a case's time
    # limit (tests/test_compile.py tests the compiled paths)
    torch._dynamo.config.disable = True


def _fork(work: Callable[[], int], cwd: Path, aux: Path, timeout: float) -> Run:
    """Run ``work()`` in a forked child set up by :func:`_child_setup`; its return value is
    the exit status. Kills the child's process group after ``timeout`` seconds."""
    aux.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    start = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "multi-threaded, use of fork()"
        pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 98
        try:
            _child_setup(cwd, aux)
            code = work()
        except SystemExit as exc:
            code = _exit_code(exc.code)
        except BaseException:  # noqa: BLE001 - whatever escaped is reported as status 99
            with contextlib.suppress(Exception):
                sys.stderr.write("harness: uncaught in the child:\n" + traceback.format_exc())
            code = 99
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    status = None
    sig = 0
    while True:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            if os.WIFSIGNALED(raw):
                sig = os.WTERMSIG(raw)
            else:
                status = os.WEXITSTATUS(raw)
            break
        if time.monotonic() - start > timeout:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            break
        time.sleep(0.005)
    seconds = time.monotonic() - start
    # anything the child started in its group (e.g. a data-loader worker) goes too
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    out = (aux / "stdout").read_text(encoding="utf-8", errors="backslashreplace")
    err = (aux / "stderr").read_text(encoding="utf-8", errors="backslashreplace")
    tracebacks = sorted((aux / "tmp").rglob("traceback-*.txt")) if (aux / "tmp").is_dir() else []
    return Run(
        status,
        sig,
        out,
        err,
        seconds,
        tracebacks[0].read_text(errors="replace")[-4000:] if tracebacks else "",
    )


def _exit_code(code: Any) -> int:
    """What the interpreter makes of ``sys.exit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    with contextlib.suppress(Exception):
        sys.stderr.write(f"{code}\n")
    return 1


#: What the commands import when they run (cli.py imports lazily): imported once in the pytest
#: process, a case's child starts with them (an eval then takes 0.2 s instead of 4 s).
PRELOAD = (
    "contrastseg.cli",
    "contrastseg.workflow",
    "contrastseg.engine.trainer",
    "contrastseg.engine.inference",
    "contrastseg.engine.evaluator",
    "contrastseg.engine.resume",
    "contrastseg.export",
    "contrastseg.convert",
    "contrastseg.data.check",
    "contrastseg.models.summary",
    "contrastseg.report",
    "contrastseg.rundir",
    "contrastseg.viz.embeddings",
    "contrastseg.viz.compare",
    "contrastseg.onnx_predict",
    "onnxruntime",
    "timm",
)


def preload() -> None:
    """Import :data:`PRELOAD` (a module that fails to import is left to the command)."""
    import importlib

    for name in PRELOAD:
        with contextlib.suppress(Exception):
            importlib.import_module(name)


def run_cli(argv: list[str], cwd: Path, aux: Path, timeout: float) -> Run:
    """``contrastseg ARGV`` in a forked child (see the module docstring)."""

    def work() -> int:
        from contrastseg import cli

        sys.argv = ["contrastseg", *argv]
        cli.main()
        return 0

    return _fork(work, cwd, aux, timeout)


def call_in_child(fn: Callable[..., Any], *args: Any, timeout: float = 120, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in a forked child; its (picklable) result, or ``ChildFailed``
    with what the child printed when it raised, crashed or ran out of time."""
    aux = Path(tempfile.mkdtemp(prefix="fuzz-call-"))
    try:
        result_path = aux / "result.pickle"

        def work() -> int:
            value = fn(*args, **kwargs)
            result_path.write_bytes(pickle.dumps(value))
            return 0

        run = _fork(work, aux, aux, timeout)
        if run.status != 0 or not result_path.exists():
            raise ChildFailed(
                f"{getattr(fn, '__name__', fn)}: status {run.status}, signal {run.signal}, "
                f"{run.seconds:.1f} s\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
            )
        return pickle.loads(result_path.read_bytes())
    finally:
        shutil.rmtree(aux, ignore_errors=True)


class ChildFailed(RuntimeError):
    """A harness child (not a case) failed."""


# ----------------------------------------------------------------------------- cases
Validator = Callable[[Path, Run], "str | None"]


@dataclass
class Case:
    """One generated input and the command run on it.

    ``make(work)`` writes the input files into the case folder ``work`` (the working directory
    of the command); ``argv`` are the command's arguments (paths relative to ``work``).
    ``expect``: ``ok``, ``refuse`` or ``either``. A refusal must name one of ``culprits`` (a
    path is also found absolute). ``validate(work, run)`` says what is wrong with the outputs
    of a success (None: nothing). ``outputs``: paths (globs) the command writes, which must not
    exist after a refusal; ``may_leave``: globs of other new paths a refusal may leave (a run
    folder with its logs). ``report_status``: ``data check`` and ``predict`` without
    ``--strict`` report broken files with status 1 (accepted as a refusal when the culprit is
    on stdout). ``marker``/``canary``: a payload's marker file (must not appear) and canary
    folder (must not vanish). ``skip_warning``: for ``--resume``, a success that names this
    path in a WARNING line (the broken newest checkpoint skipped) is accepted as a refusal.
    """

    family: str
    description: str
    argv: list[str]
    make: Callable[[Path], None]
    expect: str = "either"
    culprits: tuple[str, ...] = ()
    timeout: float = 30.0
    validate: Validator | None = None
    outputs: tuple[str, ...] = ()
    may_leave: tuple[str, ...] = ()
    report_status: bool = False
    marker: str | None = None
    canary: str | None = None
    skip_warning: str | None = None
    inputs_may_change: tuple[str, ...] = ()

    @property
    def command(self) -> str:
        return "contrastseg " + " ".join(shlex.quote(a) for a in self.argv)


@dataclass
class Outcome:
    outcome: str
    reason: str
    run: Run
    error_line: str = ""
    extra: dict = field(default_factory=dict)


def _snapshot(work: Path) -> dict[str, str]:
    """relative path -> ``dir``, ``link`` or the sha256 of a regular file's bytes (other kinds:
    their type), without following links."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(work):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(work))
            if path.is_symlink():
                out[rel] = "link"
            elif path.is_dir():
                out[rel] = "dir"
            elif path.is_file():
                try:
                    out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
                except OSError:
                    out[rel] = "unreadable"
            else:
                out[rel] = "special"
    return out


def _names_culprit(line: str, culprits: tuple[str, ...], work: Path) -> bool:
    if not culprits:
        return True
    for culprit in culprits:
        forms = {culprit}
        if culprit and not culprit.startswith("-"):
            forms.add(str(work / culprit))
            with contextlib.suppress(OSError, ValueError, RuntimeError):  # RuntimeError: a loop
                forms.add(str((work / culprit).resolve()))
        forms |= {repr(f)[1:-1] for f in list(forms)}  # as a repr shows it
        # a newline in a name as a one-line message shows it (cli.main joins lines with "; ")
        forms |= {f.replace("\n", sep) for f in list(forms) for sep in ("; ", " ")}
        # a name of thousands of characters may be shown cut short
        forms |= {f[:60] for f in list(forms) if len(f) > 200}
        if any(f and f in line for f in forms):
            return True
    return False


def _stray_lines(stderr: str, usage_ok: bool) -> list[str]:
    """stderr lines that are neither an error line nor an allowed one (module docstring)."""
    stray = []
    after_warning = False
    for line in stderr.splitlines():
        if after_warning and line.startswith(" "):
            after_warning = False
            continue
        after_warning = bool(_ALLOWED[1].match(line))
        if _ERROR.match(line) or any(p.match(line) for p in _ALLOWED):
            continue
        if usage_ok and any(p.match(line) for p in _USAGE):
            continue
        if not line.strip():
            stray.append("(an empty line)")
            continue
        stray.append(line)
    return stray


def classify(case: Case, run: Run, work: Path, before: dict[str, str]) -> Outcome:
    """The outcome of ``case`` (see the module docstring)."""
    text = run.stdout + run.stderr
    errors = [line for line in run.stderr.splitlines() if _ERROR.match(line)]
    error_line = errors[0] if errors else ""

    def out(outcome: str, reason: str) -> Outcome:
        return Outcome(outcome, reason, run, error_line)

    if case.marker and (work / case.marker).exists():
        return out("executed", f"the payload's marker {case.marker} was written")
    if case.canary and not (work / case.canary).is_dir():
        return out("executed", f"the payload removed the canary folder {case.canary}")
    if run.hung:
        return out("hang", f"still running after {case.timeout:.0f} s (killed)")
    if "Traceback (most recent call last)" in text or _INTERNAL in text or run.status == 99:
        first = next((ln for ln in run.stderr.splitlines() if _INTERNAL in ln), "")
        return out("traceback", first or "a traceback in the output")
    if run.signal:
        return out("other", f"killed by signal {signal.Signals(run.signal).name}")

    after = _snapshot(work)
    tmp = [p for p in after if re.fullmatch(r"\..+\.tmp", Path(p).name)]
    if tmp:
        return out("leftover", f"temporary file(s) left: {tmp[:3]}")
    changed = [
        p
        for p, digest in before.items()
        if after.get(p) != digest
        and digest != "dir"
        and not any(fnmatch.fnmatch(p, g) for g in case.inputs_may_change)
    ]
    refused = run.status == 2 or (case.report_status and run.status == 1)
    if refused:
        new = [p for p in after if p not in before]
        outputs = [p for p in new if any(fnmatch.fnmatch(p, g) for g in case.outputs)]
        if outputs:
            return out("leftover", f"refused, but wrote {outputs[:3]}")
        empty = [p for p in new if after[p] == "dir" and not any(work.joinpath(p).iterdir())]
        if empty:
            return out("leftover", f"refused, but left the empty folder(s) {empty[:3]}")
        others = [
            p
            for p in new
            if after[p] != "dir"
            and not any(fnmatch.fnmatch(p, g) for g in case.may_leave)
            and not any(p.startswith(d + "/") for d in case.may_leave)
        ]
        if others:
            return out("leftover", f"refused, but left {others[:3]}")
    if changed:
        return out("other", f"input file(s) changed: {changed[:3]}")

    usage = run.status == 2 and bool(errors) and "Usage: " in run.stderr
    stray = _stray_lines(run.stderr, usage)
    if run.status == 0:
        if errors:
            return out("other", f"status 0 with an error line: {errors[0][:200]}")
        if case.skip_warning and _skipped(run, case.skip_warning, work):
            return out("refused", "skipped with a warning; the older checkpoint was used")
        if case.expect == "refuse":
            return out("silent", "status 0 on an input that must be refused")
        if stray:
            return out("other", f"stray stderr line(s): {stray[:2]}")
        problem = case.validate(work, run) if case.validate else None
        if problem:
            return out("other", f"status 0 but the outputs are wrong: {problem}")
        return out("ok", "")
    if run.status == 2:
        if len(errors) != 1:
            return out("other", f"status 2 with {len(errors)} error lines: {run.stderr[-300:]!r}")
        if stray:
            return out("other", f"stray stderr line(s) beside the error: {stray[:2]}")
        named = _names_culprit(error_line, case.culprits, work)
        if not named and case.report_status:  # "see the report above" / "warnings above"
            named = _names_culprit(run.stdout, case.culprits, work) or any(
                _skipped_line(ln, case.culprits, work) for ln in run.stderr.splitlines()
            )
        if not named:
            return out("other", f"the error line names none of {list(case.culprits)[:4]}")
        if case.expect == "ok":
            return out("other", "refused a valid input")
        return out("refused", "")
    if run.status == 1 and case.report_status:
        if errors:
            return out("other", f"status 1 with an error line: {errors[0][:200]}")
        if not _names_culprit(run.stdout, case.culprits, work):
            return out("other", f"status 1 but the report names none of {list(case.culprits)[:4]}")
        if case.expect == "ok":
            return out("other", "reported a valid input as broken")
        return out("refused", "reported")
    return out("other", f"exit status {run.status}: {run.stderr[-300:]!r}")


def _skipped_line(line: str, culprits: tuple[str, ...], work: Path) -> bool:
    return line.startswith("WARNING ") and _names_culprit(line, culprits, work)


def _skipped(run: Run, path: str, work: Path) -> bool:
    return any(_skipped_line(line, (path,), work) for line in run.stderr.splitlines())


# ----------------------------------------------------------------------------- running
@dataclass
class Family:
    """The cases of one family run so far, and the failures among them."""

    name: str
    base: Path
    count: int = 0
    failures: list[str] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)

    def run(self, case: Case) -> Outcome:
        """Run ``case`` in a fresh folder, record it, remember a failure; with
        ``FUZZ_STOP=1`` a failure raises at once (Hypothesis then prints the example)."""
        self.count += 1
        case_dir = self.base / f"{self.name.replace(' ', '_')}-{self.count:05d}"
        work, aux = case_dir / "work", case_dir / "aux"
        work.mkdir(parents=True)
        case.make(work)
        before = _snapshot(work)
        run = run_cli(case.argv, work, aux, case.timeout)
        result = classify(case, run, work, before)
        self.outcomes[result.outcome] = self.outcomes.get(result.outcome, 0) + 1
        record(case, result)
        if result.outcome in FAILING:
            text = describe_failure(case, result)
            self.failures.append(text)
            keep = os.environ.get("FUZZ_KEEP")
            if keep:
                name = f"{self.name.replace(' ', '_')}-{os.getpid()}-{self.count:05d}"
                _keep(case_dir, Path(START) / keep / name, text)
            if os.environ.get("FUZZ_STOP", "") not in ("", "0"):
                raise AssertionError(text)
        shutil.rmtree(case_dir, ignore_errors=True)
        return result

    def check(self) -> None:
        """Fail the test when any case failed, listing each (at most 30)."""
        if not self.failures:
            return
        shown = "\n\n".join(self.failures[:30])
        more = f"\n\n... and {len(self.failures) - 30} more" if len(self.failures) > 30 else ""
        raise AssertionError(
            f"{self.name}: {len(self.failures)} of {self.count} cases failed "
            f"({self.outcomes}):\n\n{shown}{more}"
        )


def describe_failure(case: Case, result: Outcome) -> str:
    lines = [
        f"[{result.outcome}] {case.family}: {_short(case.description)}",
        f"  command: {_short(case.command)}",
        f"  expected: {case.expect}; status {result.run.status}; {_short(result.reason)}",
    ]
    if result.error_line:
        lines.append(f"  error line: {_short(result.error_line)}")
    tail = result.run.stderr.strip().splitlines()[-3:]
    if tail and not result.error_line:
        lines.append("  stderr tail: " + " | ".join(t[:200] for t in tail))
    if result.run.traceback_file:
        last = [ln for ln in result.run.traceback_file.strip().splitlines() if ln.strip()][-3:]
        lines.append("  traceback ends: " + " | ".join(t.strip()[:200] for t in last))
    return "\n".join(lines)


def _short(text: str, limit: int = 300) -> str:
    """``text`` on one line (newlines shown as \\n), cut to ``limit`` characters."""
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _keep(case_dir: Path, dest: Path, text: str) -> None:
    """Copy a failing case's folder (its inputs and outputs) for a look afterwards."""
    with contextlib.suppress(OSError):
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(case_dir, dest, symlinks=True, ignore_dangling_symlinks=True)
        (dest / "failure.txt").write_text(text + "\n")


def record(case: Case, result: Outcome) -> None:
    """Append the case's line to ``FUZZ_RECORD`` (JSON lines; one ``write`` of an ``O_APPEND``
    file per case, so several pytest-xdist workers can share the file)."""
    path = os.environ.get("FUZZ_RECORD")
    if not path:
        return
    path = os.path.join(START, path)
    line = {
        "family": case.family,
        "case": _short(case.description, 1000),
        "command": _short(case.command, 1000),
        "expect": case.expect,
        "outcome": result.outcome,
        "reason": result.reason,
        "status": result.run.status,
        "error": _short(result.error_line, 500),
        "seconds": round(result.run.seconds, 3),
    }
    data = (json.dumps(line, ensure_ascii=True) + "\n").encode()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- inputs
def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk with its CRC."""
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_16bit_rgb(height: int, width: int, seed: int = 0) -> bytes:
    """A valid PNG of 16 bits per channel, colour type 2 (RGB): Pillow opens it as mode RGB
    with each value cut to its high byte, so only a reader that looks at the bit depth sees
    that 8-bit RGB would lose information."""
    import random
    import struct
    import zlib

    rnd = random.Random(seed)
    rows = b"".join(
        b"\x00" + bytes(rnd.getrandbits(8) for _ in range(6 * width)) for _ in range(height)
    )
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def png_with_size(data: bytes, height: int, width: int) -> bytes:
    """``data`` (a PNG) with its IHDR's width and height replaced, CRC recomputed."""
    import struct
    import zlib

    assert data[12:16] == b"IHDR"
    ihdr = struct.pack(">II", width, height) + data[24:29]
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return data[:16] + ihdr + crc + data[33:]


def jpeg_with_size(data: bytes, height: int, width: int) -> bytes:
    """``data`` (a baseline or progressive JPEG) with its SOF's height and width replaced."""
    import struct

    for marker in (b"\xff\xc0", b"\xff\xc2", b"\xff\xc1"):
        at = data.find(marker)
        if at >= 0:
            return data[: at + 5] + struct.pack(">HH", height, width) + data[at + 9 :]
    raise ValueError("no SOF marker")


class Reduce:
    """A pickle payload: unpickling calls ``fn(*args)``. ``fn`` may be another ``Reduce``
    (a chain: ``getattr(__import__('os'), 'system')('...')``)."""

    def __init__(self, fn: Any, *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple:
        return (self.fn, self.args)

    def __call__(self, *args: Any) -> Any:  # pickle wants a callable in a reduce
        raise RuntimeError("a payload is not called when pickled")


def payloads(marker: Path, canary: Path, script: Path) -> dict[str, Any]:
    """Name -> object whose unpickling writes ``marker`` (or removes ``canary``; ``script`` is
    a Python file that writes ``marker``), each through another door."""
    import builtins
    import importlib
    import pathlib
    import runpy
    import subprocess

    touch = f"touch {shlex.quote(str(marker))}"
    return {
        "os.system": Reduce(os.system, touch),
        "builtins.exec": Reduce(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "builtins.eval": Reduce(builtins.eval, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.getoutput": Reduce(subprocess.getoutput, touch),
        "importlib.import_module chain": Reduce(
            Reduce(builtins.getattr, Reduce(importlib.import_module, "os"), "system"), touch
        ),
        "getattr(__import__) chain": Reduce(
            Reduce(builtins.getattr, Reduce(builtins.__import__, "os"), "system"), touch
        ),
        "pathlib.Path.touch": Reduce(
            Reduce(builtins.getattr, Reduce(pathlib.Path, str(marker)), "touch")
        ),
        "runpy.run_path": Reduce(runpy.run_path, str(script)),
        "shutil.rmtree": Reduce(shutil.rmtree, str(canary)),
    }


#: Hand-written pickles (protocol 2) for the names no Python object pickles as.
def raw_payloads(marker: Path) -> dict[str, bytes]:
    touch = f"touch {shlex.quote(str(marker))}".encode()

    def call(module: bytes, name: bytes, arg: bytes) -> bytes:
        text = b"X" + len(arg).to_bytes(4, "little") + arg  # BINUNICODE
        return b"\x80\x02c" + module + b"\n" + name + b"\n" + text + b"\x85R."  # TUPLE1 REDUCE

    return {
        "os.system (raw)": call(b"os", b"system", touch),
        "posix.system (raw)": call(b"posix", b"system", touch),
        "nt.system (raw)": call(b"nt", b"system", touch),
        "builtins.exec (raw)": call(
            b"builtins", b"exec", f"open({str(marker)!r}, 'w').close()".encode()
        ),
        "__builtin__.eval (raw)": call(
            b"__builtin__", b"eval", f"open({str(marker)!r}, 'w').close()".encode()
        ),
    }


def torch_zip(data_pkl: bytes, records: dict[str, bytes] | None = None) -> bytes:
    """The bytes of a torch.save zip whose ``data.pkl`` is ``data_pkl`` (and other records)."""
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/.format_version", "1")
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
        for name, data in (records or {}).items():
            z.writestr(f"archive/{name}", data)
    return buf.getvalue()


# ----------------------------------------------------------------------------- checkpoints
# These run in a child (call_in_child): they use torch.


def checkpoint_info(path: str) -> dict:
    """What the families need to know of the fixture's checkpoint: its top-level keys, its
    weights (name -> (shape, dtype)), whether it has a content digest, and the byte ranges of
    its zip records (name -> (header offset, data offset, size))."""
    import zipfile

    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    weights = {
        name: (tuple(t.shape), str(t.dtype).removeprefix("torch."))
        for name, t in state["model"].items()
    }
    records = {}
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            # the data follows the local header: 30 bytes, the name and the extra field
            with open(path, "rb") as f:
                f.seek(info.header_offset + 26)
                lengths = f.read(4)
            start = info.header_offset + 30 + int.from_bytes(lengths[:2], "little")
            start += int.from_bytes(lengths[2:], "little")
            records[info.filename] = (info.header_offset, start, info.file_size)
    return {
        "keys": list(state),
        "weights": weights,
        "digest": "digest" in state,
        "records": records,
        "size": Path(path).stat().st_size,
        "iteration": state.get("iteration"),
    }


def _wrong(kind: str) -> Any:
    import torch

    return {
        "int": 7,
        "str": "x",
        "list": [1, 2],
        "none": None,
        "dict": {},
        "tensor": torch.ones(2),
        "bool": True,
        "float": 0.5,
        "nested": {"a": [{"b": None}]},
        "empty str": "",
        "negative": -3,
    }[kind]


def set_dotted(tree: dict, dotted: str, value: Any, drop: bool = False) -> None:
    """Set (or with ``drop`` remove) the key ``a.b.c`` of a nested dict, making missing parents."""
    *parents, last = dotted.split(".")
    for part in parents:
        node = tree.get(part)
        if not isinstance(node, dict):
            node = tree[part] = {}
        tree = node
    if drop:
        tree.pop(last, None)
    else:
        tree[last] = value


def mutate_checkpoint(src: str, dst: str, spec: tuple, seal: str) -> str:
    """Load ``src``, apply the mutation ``spec`` (see :func:`describe_mutation`), seal it
    (``sealed``: a content digest of the new contents, when the product writes digests;
    ``stale``: the original digest kept; ``none``: no digest) and torch.save it to ``dst``.
    Returns how it was sealed, and whether the contents differ from the original's (a
    reshape that keeps the shape changes nothing)."""
    import torch

    state = torch.load(src, map_location="cpu", weights_only=True)
    original = torch.load(src, map_location="cpu", weights_only=True)
    op, *args = spec
    model = state.get("model")
    if op == "drop":
        state.pop(args[0], None)
    elif op in ("replace", "add"):
        state[args[0]] = _wrong(args[1])
    elif op == "set":
        state[args[0]] = args[1]
    elif op == "config":
        set_dotted(state["config"], args[0], args[1])
    elif op == "config drop":
        set_dotted(state["config"], args[0], None, drop=True)
    elif op == "weight shape":
        name, how = args
        t = model[name]
        flat = t.reshape(-1) if t.dim() == 0 else t
        if how == "one row less" and flat.shape[0] > 1:
            model[name] = flat[:-1].clone()
        elif how in ("one row more", "one row less"):
            model[name] = torch.cat([flat, flat[:1]])
        elif how == "extra dimension":
            model[name] = t[None].clone()
        elif how == "flattened":
            model[name] = t.reshape(-1).clone()
        elif how == "scalar":
            model[name] = t.reshape(-1)[0].clone()
        elif how == "empty":
            model[name] = t.new_empty((0,))
    elif op == "weight dtype":
        name, dtype = args
        model[name] = model[name].to(getattr(torch, dtype))
    elif op == "weight value":
        name, value, where = args
        t = model[name].clone()
        if t.is_floating_point():
            if where == "all":
                t.fill_(float(value))
            else:
                t.view(-1)[t.numel() // 2] = float(value)
        model[name] = t
    elif op == "weight drop":
        model.pop(args[0])
    elif op == "weight add":
        model[args[0]] = torch.zeros(3)
    elif op == "weight type":
        model[args[0]] = _wrong(args[1])
    elif op == "optimizer":
        what = args[0]
        opt = state["optimizer"]
        if what == "drop state":
            opt.pop("state", None)
        elif what == "drop param_groups":
            opt.pop("param_groups", None)
        elif what == "lr nan":
            opt["param_groups"][0]["lr"] = float("nan")
        elif what == "momentum buffer shape":
            first = next(iter(opt["state"].values()), None)
            if first and "momentum_buffer" in first:
                first["momentum_buffer"] = first["momentum_buffer"].reshape(-1)[:1].clone()
        elif what == "param_groups not a list":
            opt["param_groups"] = {"lr": 1}
    elif op == "rng":
        what = args[0]
        if what == "torch state truncated":
            state["rng"]["torch"] = state["rng"]["torch"][:10].clone()
        elif what == "torch state float":
            state["rng"]["torch"] = state["rng"]["torch"].float()
        elif what == "torch state str":
            state["rng"]["torch"] = "seed"
    elif op == "processes":
        what = args[0]
        if what == "empty list":
            state["processes"] = []
        elif what == "entry not a dict":
            state["processes"] = [1]
        elif what == "rng missing":
            state["processes"] = [{"loss": {}}]
    else:
        raise ValueError(f"unknown mutation {spec}")
    had = "digest" in state
    if seal == "sealed" and had:
        state = _digest().sealed(state)
    elif seal == "none":
        state.pop("digest", None)
    elif seal == "stale" and not had:
        seal = "none"
    torch.save(state, dst)
    return seal, not _same(state, original)


def _digest() -> Any:
    """The product's digest module (``sealed``, ``digest_problem``), None before it had one."""
    import importlib

    for name in ("contrastseg.digest", "contrastseg.engine.digest"):
        with contextlib.suppress(ImportError):
            return importlib.import_module(name)
    return None


def loads_like(path: str, original: str) -> str:
    """``same`` when ``torch.load(path, weights_only=True)`` gives exactly what ``original``
    gives (every tensor's dtype, shape and values, every other value), ``different`` when it
    loads to something else, ``unloadable`` when it does not load."""
    import torch

    try:
        new = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any failure to load counts
        return "unloadable"
    old = torch.load(original, map_location="cpu", weights_only=True)
    return "same" if _same(new, old) else "different"


def _same(a: Any, b: Any) -> bool:
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and bool(torch.equal(a, b) or (a.is_floating_point() and _same_bits(a, b)))
        )
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and a != a:
        return b != b
    return a == b


def _same_bits(a: Any, b: Any) -> bool:
    import torch

    return bool(torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


def upgraded_problem(new: str, old: str) -> str | None:
    """What is wrong with the file ``checkpoint upgrade OLD NEW`` wrote (None: nothing): it
    must load safely, be format 2, carry a digest that vouches for it (when the product
    writes digests), and hold the weights of ``old``."""
    import torch

    try:
        state = torch.load(new, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        return f"{new} does not load: {err}"
    if not isinstance(state, dict) or state.get("format_version") != 2:
        return f"{new} is not format 2"
    digest = _digest()
    if digest is not None:
        if "digest" not in state:
            return f"{new} has no digest"
        problem = digest.digest_problem(state)
        if problem:
            return f"{new}: {problem}"
    before = torch.load(old, map_location="cpu", weights_only=True)
    model = before.get("model") if isinstance(before, dict) else None
    if isinstance(model, dict) and not _same(dict(state["model"]), dict(model)):
        return f"{new} holds other weights than {old}"
    return None


def save_payload(obj: Any, dst: str, container: str, base: str) -> None:
    """Write a payload file: ``torch.save`` of ``obj`` (``zip``), a checkpoint whose config
    holds it (``inside checkpoint``), or a bare pickle (``legacy pickle``); raw payload bytes
    go into a torch zip's data.pkl or stay bare."""
    import torch

    if isinstance(obj, bytes):
        Path(dst).write_bytes(torch_zip(obj) if container != "legacy pickle" else obj)
        return
    if container == "zip":
        torch.save(obj, dst)
    elif container == "inside checkpoint":
        state = torch.load(base, map_location="cpu", weights_only=True)
        state["config"]["data"]["root"] = obj
        torch.save(state, dst)
    else:
        Path(dst).write_bytes(pickle.dumps(obj, protocol=2))


def save_claiming(dst: str, how: str) -> None:
    """A .pt whose records claim more than they hold: a tensor whose view reaches past its
    storage, a storage claiming 2**40 elements, a zip record claiming 2**31 bytes."""
    import torch

    t = torch.arange(4, dtype=torch.float32)
    if how == "view past its storage":
        obj = Reduce(
            torch._utils._rebuild_tensor_v2,
            t.storage(),
            0,
            (1 << 20,),
            (1,),
            False,
            {},
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.save({"model": obj}, dst)
        return
    torch.save({"model": {"w": t}}, dst)
    data = bytearray(Path(dst).read_bytes())
    if how == "storage of 2**40 elements":
        # the persistent id's numel (BININT/LONG) follows the location string 'cpu'
        at = data.find(b"cpu")
        assert at > 0
        tail = data[at + 3 :]
        if tail[:1] == b"K":  # BININT1 4 -> LONG1 of 2**40
            data[at + 3 : at + 5] = b"\x8a\x06" + (1 << 40).to_bytes(6, "little")
        Path(dst).write_bytes(bytes(data))
    elif how == "zip record of 2**31 bytes":
        # the central directory's size fields of the tensor record
        name = b"archive/data/0"
        at = data.rfind(b"PK\x01\x02", 0, data.rfind(name))
        data[at + 20 : at + 28] = (1 << 31).to_bytes(4, "little") * 2
        Path(dst).write_bytes(bytes(data))


def onnx_model(kind: str, classes: int = 3) -> bytes:
    """A tiny ONNX model as ``contrastseg export`` names its input and output (``image`` ->
    ``logits``): a 1x1 convolution of the image to ``classes`` channels, dynamic batch, height
    and width; ``kind`` makes it odd: ``more outputs`` (classes + 2 channels), ``one output``,
    ``nan weights``, ``inf weights``, ``pooled`` (1x1 logits whatever the image), ``rank 3``
    (no class axis), ``int64 ids`` (argmax inside), ``half the size`` (strided), ``other
    input name``, ``two inputs``, ``external data`` (its weights in ``/dev/zero``)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    k = {"more outputs": classes + 2, "one output": 1}.get(kind, classes)
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((k, 3, 1, 1)).astype(np.float32)
    if kind == "nan weights":
        weight[:] = np.nan
    elif kind == "inf weights":
        weight[0, 0, 0, 0] = np.inf
    init = numpy_helper.from_array(weight, "w")
    name = "pixels" if kind == "other input name" else "image"
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["b", 3, "h", "w"])]
    post = kind in ("pooled", "rank 3", "int64 ids")  # a node after the convolution
    strides = [2, 2] if kind == "half the size" else [1, 1]
    conv = helper.make_node("Conv", [name, "w"], ["conv" if post else "logits"], strides=strides)
    nodes = [conv]
    out_type, out_shape = TensorProto.FLOAT, ["b", k, "h", "w"]
    if kind == "pooled":
        nodes.append(helper.make_node("GlobalAveragePool", ["conv"], ["logits"]))
        out_shape = ["b", k, 1, 1]
    elif kind == "rank 3":
        nodes.append(helper.make_node("ReduceMax", ["conv"], ["logits"], keepdims=0, axes=[1]))
        out_shape = ["b", "h", "w"]
    elif kind == "int64 ids":
        nodes.append(helper.make_node("ArgMax", ["conv"], ["logits"], axis=1, keepdims=1))
        out_type, out_shape = TensorProto.INT64, ["b", 1, "h", "w"]
    if kind == "two inputs":
        inputs.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, ["b"]))
    output = helper.make_tensor_value_info("logits", out_type, out_shape)
    graph = helper.make_graph(nodes, "tiny", inputs, [output], [init])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if kind == "external data":
        tensor = model.graph.initializer[0]
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (
            ("location", "/dev/zero"),
            ("offset", "0"),
            ("length", str(weight.nbytes)),
        ):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    return model.SerializeToString()


def onnx_sidecar(classes: list[str], palette: list[list[int]]) -> dict:
    """The sidecar ``contrastseg export`` writes beside an ONNX model, for :func:`onnx_model`."""
    return {
        "sidecar_version": 1,
        "format": "onnx",
        "file": "m.onnx",
        "opset": 17,
        "input": {
            "name": "image",
            "dtype": "float32",
            "shape": ["batch", 3, "height", "width"],
            "channels": "RGB",
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
        },
        "output": {"name": "logits", "dtype": "float32", "shape": ["batch", 3, "height", "width"]},
        "dynamic_axes": {"batch": 0, "height": 2, "width": 3},
        "num_classes": len(classes),
        "class_names": list(classes),
        "palette": palette,
    }
