"""What an FAI import did not carry over, one line each: which file, which
construct, and what imagesmith did instead."""

from __future__ import annotations

from dataclasses import dataclass

REPORT_FILE = "FAI-IMPORT.txt"


@dataclass(frozen=True)
class Note:
    file: str  # relative to the FAI config space, with ":LINE" where known
    construct: str
    instead: str

    def line(self) -> str:
        return f"{self.file}: {self.construct}: {self.instead}"


def format_report(notes: list[Note], header: str) -> str:
    lines = [header, ""] + [n.line() for n in notes]
    if not notes:
        lines.append("Everything carried over.")
    return "\n".join(lines) + "\n"
