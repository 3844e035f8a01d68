"""Append benchmark results to a markdown file, one entry per run, under a `## <section>` heading.

A benchmark prints its table; it writes an entry only when asked: `--report FILE` (docs/BENCHMARKS.md holds
the entries worth keeping), or $BENCHMARKS_FILE, which benchmarks.gpu_suite sets to collect its stages'
entries in its own folder. A plain run never edits the checkout.

An entry is a line with the date (UTC), the git commit (`git rev-parse --short HEAD`, marked "+dirty"
when the tree has uncommitted changes), the device and the exact command, then a markdown table of the
rows, then optional notes. Entries are appended at the end of their section (created if missing), so
each section reads oldest to newest. The file is rewritten atomically (temp file + rename).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PATH = REPO / "docs" / "BENCHMARKS.md"  # where kept entries go; never written unless named
ENV_PATH = "BENCHMARKS_FILE"  # a file to append to without --report (benchmarks.gpu_suite's stages)
COMMIT_ENV = "BENCHMARK_COMMIT"  # the commit to record where git cannot tell (benchmarks.gpu_suite --commit)
HEADER = ("# Benchmarks\n\nResults appended by `python -m benchmarks.<name> --report FILE`; each entry names its "
          "date, commit, device and command. Within a section, newest last.\n")
REPORT_HELP = ("append the result to this markdown file as a dated entry (--report docs/BENCHMARKS.md for one "
               "worth keeping); without it the result is only printed and no file is written")


def add_report_flags(parser: argparse.ArgumentParser) -> None:
    """--report FILE, and --no-report, kept as a no-op for command lines from when appending was the default."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--report", type=Path, default=None, metavar="FILE", help=REPORT_HELP)
    group.add_argument("--no-report", action="store_true",
                       help="print only: the default now (kept so that older command lines still run)")


def report_path(report: str | Path | None, no_report: bool = False) -> Path | None:
    """The file to append to: --report FILE, else $BENCHMARKS_FILE, else None (print only)."""
    if no_report:
        return None
    if report:
        return Path(report)
    return Path(os.environ[ENV_PATH]) if os.environ.get(ENV_PATH) else None


def git_commit(repo: Path = REPO) -> str:
    """Short hash of HEAD, "+dirty" if the tree differs from it; $BENCHMARK_COMMIT when set (a copy of the
    checkout without .git, e.g. on a device machine); "unknown" outside a git checkout."""
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        # The benchmarks file itself does not count: a second benchmark run right after a first would
        # otherwise always report a dirty tree.
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ".", f":!{DEFAULT_PATH.relative_to(REPO)}"], cwd=repo,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: list[dict]) -> str:
    """Columns are the union of the rows' keys, in first-seen order; missing cells stay empty."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_value(row[c]) if c in row else "" for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def format_entry(rows: list[dict], command: str, device: str, notes: str = "", *, when: dt.datetime | None = None,
                 commit: str | None = None) -> str:
    when = when or dt.datetime.now(dt.timezone.utc)
    head = (f"**{when:%Y-%m-%d %H:%M} UTC**, commit `{commit or git_commit()}`, device: {device}  \n"
            f"`{command}`")
    return "\n\n".join(part for part in (head, markdown_table(rows), notes.strip()) if part) + "\n"


def insert_entry(text: str, section: str, entry: str) -> str:
    """`text` with `entry` appended at the end of `## section` (the section is added at the end if absent)."""
    lines = text.splitlines(keepends=True)
    heading = f"## {section}"
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        return text.rstrip("\n") + f"\n\n{heading}\n\n{entry}"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    body = "".join(lines[:end]).rstrip("\n") + "\n\n" + entry
    rest = "".join(lines[end:])
    return body + ("\n" + rest if rest else "")


def append_result(section: str, rows: list[dict], command: str, device: str, notes: str = "", *,
                  path: str | Path | None = None, commit: str | None = None) -> Path:
    """Append one entry to `path`, else to $BENCHMARKS_FILE; with neither it refuses (no default file).
    commit: the code that ran, for a benchmark long enough to outlive a commit (taken at its start);
    default: git_commit() now."""
    if not rows:
        raise ValueError("append_result: no rows to write")
    target = report_path(path)
    if target is None:
        raise ValueError(f"append_result: no file named (pass path, e.g. from --report FILE, or set ${ENV_PATH})")
    target.parent.mkdir(parents=True, exist_ok=True)
    text = target.read_text() if target.exists() else HEADER
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(insert_entry(text, section, format_entry(rows, command, device, notes, commit=commit)))
    os.replace(tmp, target)
    return target


def cpu_description() -> str:
    """CPU model and logical core count, e.g. "AMD EPYC 7R13 Processor, 2 cores"."""
    name = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"
