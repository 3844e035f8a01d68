"""Append benchmark results to docs/BENCHMARKS.md: one entry per run, under a `## <section>` heading.

An entry is a line with the date (UTC), the git commit (`git rev-parse --short HEAD`, marked "+dirty"
when the tree has uncommitted changes), the device and the exact command, then a markdown table of the
rows, then optional notes. Entries are appended at the end of their section (created if missing), so
each section reads oldest to newest. The file is rewritten atomically (temp file + rename).
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PATH = REPO / "docs" / "BENCHMARKS.md"
ENV_PATH = "BENCHMARKS_FILE"  # overrides DEFAULT_PATH, e.g. for tests
COMMIT_ENV = "BENCHMARK_COMMIT"  # the commit to record where git cannot tell (benchmarks.gpu_suite --commit)
HEADER = ("# Benchmarks\n\nResults appended by `python -m benchmarks.<name>`; each entry names its date, commit, "
          "device and command. Within a section, newest last.\n")


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
    """Append one entry to the benchmarks file (`path`, else $BENCHMARKS_FILE, else docs/BENCHMARKS.md).
    commit: the code that ran, for a benchmark long enough to outlive a commit (taken at its start);
    default: git_commit() now."""
    if not rows:
        raise ValueError("append_result: no rows to write")
    target = Path(path or os.environ.get(ENV_PATH) or DEFAULT_PATH)
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
