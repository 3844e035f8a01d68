"""The argument parser every command of the project uses: a bad flag is one line that names it and, when a
flag of the command is close, says which one was meant ("--batch_size: did you mean --batch-size?"), instead
of argparse's usage block followed by "unrecognized arguments"."""

from __future__ import annotations

import argparse
import difflib
import re


def close_flag(token: str, known: list[str]) -> str | None:
    """The known flag `token` most likely meant: the same letters with _ for - (or the reverse), else the
    closest spelling."""
    name = token.split("=", 1)[0]
    for candidate in (name.replace("_", "-"), name.replace("-", "_").replace("__", "--", 1)):
        if candidate != name and candidate in known:
            return candidate
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
    return close[0] if close else None


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        hints = []
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:
            known = [s for s in self._option_string_actions if s.startswith("--")]
            for token in unknown.group(1).split():
                meant = close_flag(token, known) if token.startswith("--") else None
                if meant:
                    hints.append(f"{token.split('=', 1)[0]}: did you mean {meant}?")
        hint = "; ".join(hints) or f"see {self.prog} --help"
        self.exit(2, f"{self.prog}: error: {message} ({hint})\n")

    def require_positive(self, args: argparse.Namespace, *names: str) -> None:
        """One line naming the first of these integer flags that is below 1 (attribute names, e.g. "batch_size")."""
        for name in names:
            if getattr(args, name) < 1:
                self.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
