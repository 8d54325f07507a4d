"""User-facing errors and the exit codes every entry point shares.

A `UserError` is a problem the user can fix (a missing dataset, a bad config value, a run
that was never trained); its message names the file or field and the fix. Entry points
(`main`, `predict`, `data_prep.prepare`, `experiments.*`) catch `UserError`, print its
message on one line and exit with its `exit_code`, never with a traceback. Anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import sys

EXIT_OK = 0
EXIT_PARTIAL = 1  # prep: some videos failed, the rest were written
EXIT_USER_ERROR = 2
EXIT_STOPPED = 3  # training stopped early on request; re-running resumes


class UserError(Exception):
    """A problem with the user's input or files; the message names the fix."""

    exit_code = EXIT_USER_ERROR
    prefix = "error"


class StopRequested(UserError):
    """Training stopped early on request (`config.debug.stop_after_epochs`)."""

    exit_code = EXIT_STOPPED
    prefix = "stopped"


class DiskFullError(UserError, OSError):
    """The disk filled up during a write; the write was undone, the previous file kept.

    Also an OSError, so code that handles failed writes keeps handling it."""

    def __init__(self, folder: str, cause: BaseException | str = ""):
        self.folder = folder
        detail = f" ({first_line(cause)})" if str(cause) else ""
        super().__init__(f"the disk is full: could not write in {folder}{detail}; nothing "
                         "half-written was kept. Free some space (or point the output "
                         "elsewhere) and re-run the same command.")
        self.errno = errno.ENOSPC


def is_disk_full(error: BaseException) -> bool:
    """True for a write that failed because the disk or the quota is full (an OSError, or
    a TensorStore/TensorFlow error that only says so in its text)."""
    if isinstance(error, DiskFullError):
        return True
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(error) or "Disk quota exceeded" in str(error)


def first_line(cause: BaseException | str, limit: int = 300) -> str:
    """The first line of an exception's text, without TensorStore's JSON spec."""
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    text = text.split(" [tensorstore_spec")[0]
    if len(text) <= limit:
        return text
    head = text.split(":")[0][:40]  # e.g. DATA_LOSS; the specific cause is at the end
    return f"{head}: ...{text[-(limit - len(head) - 5):]}"


def warn(message: str, *, stream=None) -> None:
    """One warning line on stderr for a problem the program worked around."""
    print(f"warning: {message}", file=stream or sys.stderr, flush=True)


class FlagError(UserError):
    """A command-line mistake: unknown flag or config field, bad value, missing file."""


def parse_flags(argv: list[str], flag_values=None, *, config_flag: str = "config"
                ) -> list[str]:
    """An absl `flags_parser` (`app.run(main, flags_parser=errors.parse_flags)`): a flag
    mistake ends in one line naming the fix and exit status 2, instead of absl's two lines
    and status 1 or ml_collections' tracebacks."""
    from absl import flags  # light, but only entry points need it

    flag_values = flags.FLAGS if flag_values is None else flag_values
    try:
        _check_config_file(argv, config_flag, flag_values)
        try:
            rest = flag_values(argv)
        except flags.UnrecognizedFlagError as e:
            raise FlagError(_unknown_flag(e.flagname, flag_values, config_flag, argv)
                            ) from None
        except flags.Error as e:
            raise FlagError(_flag_error_line(str(e))) from None
        except (AttributeError, KeyError):  # ml_collections: an override of no field
            unknown = _unknown_config_fields(argv, flag_values, config_flag)
            if not unknown:
                raise
            raise FlagError(_unknown_flag(unknown[0], flag_values, config_flag, argv)
                            ) from None
    except FlagError as e:
        sys.exit(report(e))
    return rest


def _check_config_file(argv: list[str], config_flag: str, flag_values) -> None:
    if config_flag not in flag_values:
        return
    for i, arg in enumerate(argv[1:], 1):
        if arg.startswith(f"--{config_flag}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{config_flag}" and i + 1 < len(argv):
            value = argv[i + 1]
        else:
            continue
        path = value.split(":", 1)[0]
        if not os.path.isfile(path):
            raise FlagError(f"--{config_flag}={value}: no such config file {path!r} (from "
                            f"{os.getcwd()}); fix: give an existing file, e.g. "
                            f"--{config_flag}=configs/rarp.py")


def _config_fields(flag_values, config_flag: str, argv: list[str] = ()) -> list[str]:
    """'config.a.b' for every field of the config file named in `argv` (or the flag's
    default); none when there is no config or it does not load."""
    if config_flag not in flag_values:
        return []
    from absl import flags
    from ml_collections import config_flags

    value = flag_values[config_flag].default_as_str.strip("'\"")
    for i, arg in enumerate(argv[1:], 1):
        if arg.startswith(f"--{config_flag}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{config_flag}" and i + 1 < len(argv):
            value = argv[i + 1]
    try:  # loaded alone: an override of no field fails while the config flag parses
        alone = flags.FlagValues()
        config_flags.DEFINE_config_file(config_flag, None, "", flag_values=alone,
                                        sys_argv=["-"])
        alone(["-", f"--{config_flag}={value}"])
        flat = alone[config_flag].value.to_dict()
    except Exception:  # noqa: BLE001 - a config that does not load has no fields
        return []
    out: list[str] = []

    def walk(prefix: str, node) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(f"{prefix}.{key}", value)
            else:
                out.append(f"{prefix}.{key}")
    if isinstance(flat, dict):
        walk(config_flag, flat)
    return out


def _unknown_config_fields(argv: list[str], flag_values, config_flag: str) -> list[str]:
    fields = set(_config_fields(flag_values, config_flag, argv))
    named = [a[2:].split("=", 1)[0] for a in argv[1:] if a.startswith(f"--{config_flag}.")]
    return [n for n in named if fields and n not in fields]


def _unknown_flag(name: str, flag_values, config_flag: str, argv: list[str]) -> str:
    import difflib

    fields = _config_fields(flag_values, config_flag, argv)
    candidates = [f for f in flag_values if "." not in f] + fields
    if "." in name and not name.startswith(f"{config_flag}."):
        candidates += [f"{config_flag}.{f.split('.', 1)[1]}" for f in fields]
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.8)
    if not close and fields:  # e.g. --workdir for --config.workdir
        close = [f for f in fields if f.endswith(f".{name}")][:1]
    field = name.startswith(f"{config_flag}.")
    what = "config field" if field else "flag"
    fix = (f"did you mean --{close[0]}?" if close else
           "surgfusion_jax/config_lib.py documents every field" if field else
           "--helpfull lists the flags")
    return f"unknown {what} --{name}; {fix}"


def _flag_error_line(text: str) -> str:
    """absl's (often multi-line: a config file's traceback) message as one line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) == 1:
        return f"{lines[0]}; fix that flag (--helpfull lists the flags)"
    cause = next((line for line in reversed(lines) if "Error:" in line), lines[-1])
    return f"{lines[0].rstrip(':')}: {cause.split('Error: ', 1)[-1]}"


def report(error: UserError, *, hint: str = "", stream=None) -> int:
    """Prints `error` (and an optional hint) to stderr; returns its exit code."""
    message = f"{error.prefix}: {error}" + (f"\n{hint}" if hint else "")
    print(message, file=stream or sys.stderr)
    return error.exit_code
