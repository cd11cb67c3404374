"""What the commands read and write, checked before any work: every input path is a
readable file or directory, every output goes where the user said and can be written.

These checks run before a model is built or a data set read, so a wrong ``--out`` or an
unreadable ``--calibration`` costs a second, not an evaluation. Each failure is a
:class:`~wrapcal.cli.errors.CliError` whose message starts with the flag.

Whether a directory can be written is found by writing in it (an anonymous temporary
file, which leaves no name behind): permission bits say nothing for root, nor for a
read-only mount.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from wrapcal.cli.errors import CliError

__all__ = [
    "REPORT_FILES",
    "check_input_path",
    "check_output_file",
    "check_report_dir",
    "check_save_file",
    "data_path",
    "existing_ancestor",
    "same_file",
    "write_problem",
]

#: The files ``Report.save`` writes in its directory (``figures`` is a directory).
REPORT_FILES = ("report.html", "report.md", "report.json")
#: Data specs that name no file (:mod:`wrapcal.datasets.specs`).
_BUILTIN_SPECS = frozenset({"digits", "gaussian", "uniform"})


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same inode when both exist (hard links,
    symlinks, ``./x`` and ``x``), else the same resolved path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def existing_ancestor(path: Path) -> Path:
    """``path`` itself when it exists, else its nearest existing ancestor."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def write_problem(directory: Path) -> str | None:
    """Why nothing can be written in ``directory`` (by trying), or ``None``."""
    if not os.access(directory, os.W_OK | os.X_OK):
        return "permission denied"
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        return err.strerror or type(err).__name__
    return None


def _check_writable_place(path: Path, flag: str, what: str) -> None:
    """The directory that will hold ``path`` (or the nearest existing one above it, which
    the writer creates the rest under) is a directory that can be written."""
    base = existing_ancestor(path.parent if what == "file" else path)
    if not base.is_dir():
        raise CliError(
            f"{flag} {path}: {base} is a file, so nothing can be created under it; give a "
            f"{what} path whose folders are folders"
        )
    problem = write_problem(base)
    if problem is not None:
        raise CliError(
            f"{flag} {path}: cannot write in {base} ({problem}); give a {what} in a folder "
            "you can write to"
        )


def check_report_dir(out: str | Path, inputs: Iterable[Path] = (), flag: str = "--out") -> Path:
    """The report directory a command writes: a directory (created if missing) that can
    be written, whose report files can be replaced, and which is none of the inputs.

    Args:
        out: The directory given.
        inputs: The paths the command reads (data, weights, the model): writing the
            report into one of them would change it.
        flag: The flag that gave ``out``.

    Raises:
        CliError: What is wrong, naming ``flag``.
    """
    path = Path(out)
    if not str(out).strip():
        raise CliError(f"{flag} is empty; give the report directory, e.g. {flag} report")
    if path.exists() and not path.is_dir():
        raise CliError(
            f"{flag} {path} is a file; the report is a directory (report.html, report.md, "
            f"report.json, figures/): give a directory, created if missing"
        )
    for source in inputs:
        if source.exists() and same_file(path, source):
            raise CliError(
                f"{flag} {path} is also an input of this command; writing the report there "
                "would change it: give another directory"
            )
    if path.is_dir():
        for name in REPORT_FILES:
            if (path / name).exists() and not (path / name).is_file():
                raise CliError(
                    f"{flag} {path}: {path / name} is not a file, so the report cannot "
                    "replace it; give another directory"
                )
        if (path / "figures").exists() and not (path / "figures").is_dir():
            raise CliError(
                f"{flag} {path}: {path / 'figures'} is a file where the figures folder goes; "
                "give another directory"
            )
    _check_writable_place(path, flag, "directory")
    return path


def check_output_file(out: Path, flag: str, source: Path, example: str) -> None:
    """A file a command writes: not a directory, not the command's input, and in a
    place that can be written.

    Args:
        out: The file to write.
        flag: The flag that gave it (or that would change the default).
        source: The input file, which must survive the command.
        example: A good value, for the message (``model.onnx``).

    Raises:
        CliError: What is wrong, naming ``flag``.
    """
    if same_file(out, source):
        raise CliError(f"{flag} {out} is the model file itself; give another path")
    _check_file_target(out, flag, example)


def _check_file_target(out: Path, flag: str, example: str) -> None:
    """Not a directory, not a special file, in a place that can be written."""
    if out.is_dir():
        raise CliError(f"{flag} {out} is a directory; give the file to write, e.g. {example}")
    if out.exists() and not out.is_file():
        raise CliError(f"{flag} {out} exists and is not a regular file; give another path")
    _check_writable_place(out, flag, "file")


def check_save_file(
    save: str | Path, inputs: Iterable[Path] = (), report: str | Path | None = None
) -> Path:
    """``--save FILE``: the fitted model's file, checked as :func:`check_output_file`
    checks an export's, against every input of the command and the report directory.

    Args:
        save: The file given.
        inputs: The paths the command reads (weights, data): saving over one would
            change it.
        report: The report directory (``evaluate --out``), when there is one.

    Raises:
        CliError: What is wrong, naming ``--save``.
    """
    path = Path(save)
    if not str(save).strip():
        raise CliError("--save is empty; give the file to write, e.g. --save model.wrapcal")
    for source in inputs:
        if source.exists() and same_file(path, source):
            raise CliError(
                f"--save {path} is also an input of this command; saving there would change "
                "it: give another path"
            )
    if report is not None and same_file(path, Path(report)):
        raise CliError(f"--save {path} is the report directory (--out); give another path")
    _check_file_target(path, "--save", "model.wrapcal")
    return path


def check_input_path(
    path: Path, flag: str, *, directory_ok: bool = True, what: str = "file or directory"
) -> None:
    """An input is there and readable, and is a regular file (or a directory): a FIFO,
    device or socket would block the command or feed it endless bytes.

    Args:
        path: The input.
        flag: The flag that gave it, to begin messages.
        directory_ok: Whether a directory is an input this flag takes.
        what: What the flag gives, for the message when it is missing (``test data``).

    Raises:
        FileNotFoundError: No such path (the message starts with ``flag``).
        CliError: Not a regular file or directory, or unreadable.
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        missing = f"{flag} {path}: {what} not found (no such file or directory)"
        raise FileNotFoundError(missing) from None
    except OSError as err:
        raise CliError(f"{flag} {path}: cannot read it ({err.strerror})") from None
    if stat.S_ISDIR(mode) and directory_ok:
        try:
            os.listdir(path)
        except OSError as err:
            raise CliError(f"{flag} {path}: cannot read the directory ({err.strerror})") from None
        return
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise CliError(
            f"{flag} {path} is {kind} (a FIFO, device or socket cannot be read as data); "
            "give a regular file"
            if kind != "a directory"
            else f"{flag} {path} is a directory; give a file"
        )
    try:
        # O_NONBLOCK: a file swapped for a FIFO since the stat cannot hang the check.
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
    except OSError as err:
        raise CliError(f"{flag} {path}: cannot read it ({err.strerror})") from None


def data_path(spec: str) -> Path | None:
    """The path a data spec names (``None`` for ``digits`` and noise)."""
    return None if spec in _BUILTIN_SPECS else Path(spec)
