"""Turn docs/walkthrough.md into one bash script, so the doc cannot rot.

Rules the doc follows (and that this module enforces):

- every fenced block opened with ```` ```bash ```` is a command block: its lines
  run, in document order, in ONE bash process (``set -euo pipefail``), so an
  ``export`` or a ``cd`` in one block holds for the next, as in the user's shell;
- every ```` ```python ```` block runs too, at its place in the order, as
  ``python - <<EOF ... EOF`` in the current directory (the doc's Python snippet
  is written for a notebook started in the work directory);
- a block whose opening fence is directly preceded by a line
  ``<!-- not run in tests: REASON -->`` is skipped; REASON must be given;
- other blocks (```` ```text ````, ```` ```yaml ````) are output excerpts and
  file listings: never run.

Nothing is substituted: the doc works in ``$PWD`` (``export REPO=$PWD/repo``),
and the test starts the script in a temporary directory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DOC", "Block", "DocFormatError", "bash_script", "parse_blocks", "runnable_blocks"]

#: the doc under test
DOC = Path(__file__).resolve().parents[2] / "docs" / "walkthrough.md"

_FENCE = re.compile(r"^```(\S*)\s*$")
_SKIP = re.compile(r"^<!--\s*not run in tests:(.*?)-->\s*$")
_ANY_SKIP = re.compile(r"^<!--\s*not run in tests")
RUN_LANGUAGES = ("bash", "python")
#: the heredoc delimiter for Python blocks (must not appear in the doc)
PY_EOF = "__WALKTHROUGH_PYTHON__"


class DocFormatError(ValueError):
    """The doc breaks one of the rules above (named with its line number)."""


@dataclass(frozen=True)
class Block:
    """One fenced block of the doc."""

    language: str
    code: str
    #: 1-based line of the opening fence
    line: int
    #: why the block is not run by the test ("" when it is run)
    skip_reason: str = ""

    @property
    def runs(self) -> bool:
        return self.language in RUN_LANGUAGES and not self.skip_reason


def parse_blocks(text: str) -> list[Block]:
    """All fenced blocks of a Markdown text, in order, with their skip marks."""
    blocks = []
    lines = text.splitlines()
    index = 0
    previous = ""  # last non-blank line before a fence
    while index < len(lines):
        line = lines[index]
        match = _FENCE.match(line)
        if not match:
            if line.strip():
                previous = line.strip()
            index += 1
            continue
        language, start = match.group(1), index
        body = []
        index += 1
        while index < len(lines) and lines[index].rstrip() != "```":
            body.append(lines[index])
            index += 1
        if index == len(lines):
            raise DocFormatError(f"line {start + 1}: a ```{language} block is never closed")
        reason = ""
        if _ANY_SKIP.match(previous):
            skip = _SKIP.match(previous)
            reason = skip.group(1).strip() if skip else ""
            if not reason:
                raise DocFormatError(
                    f"line {start + 1}: a skipped block must say why: <!-- not run in tests: REASON -->"
                )
            if language not in RUN_LANGUAGES:
                raise DocFormatError(
                    f"line {start + 1}: only bash/python blocks can be skipped, not {language!r}"
                )
        blocks.append(Block(language, "\n".join(body), start + 1, reason))
        previous = ""
        index += 1
    return blocks


def runnable_blocks(text: str) -> list[Block]:
    """The blocks the test runs, in order."""
    return [block for block in parse_blocks(text) if block.runs]


def bash_script(text: str, preamble: str = "") -> str:
    """One bash script running the doc's blocks in order.

    A failing command stops the script with a line ``WALKTHROUGH FAILED at doc
    line N: COMMAND`` on stderr.
    """
    parts = [
        "set -euo pipefail",
        "trap 'echo \"WALKTHROUGH FAILED at doc line $WALKTHROUGH_LINE: $BASH_COMMAND (exit $?)\" >&2' ERR",
        preamble,
    ]
    for block in runnable_blocks(text):
        parts.append(f"WALKTHROUGH_LINE={block.line}")
        parts.append(f'echo "=== doc line {block.line} ({block.language}) ==="')
        if block.language == "bash":
            parts.append(block.code)
        else:
            if PY_EOF in block.code:
                raise DocFormatError(f"line {block.line}: the Python block contains {PY_EOF}")
            parts.append(f"python - <<'{PY_EOF}'\n{block.code}\n{PY_EOF}")
    parts.append('echo "=== walkthrough done ==="')
    return "\n".join(parts) + "\n"
