"""How the command-line tools report a mistake the user can fix: `tool: message` on stderr and exit status 2 (argparse's
usage-error status), instead of a traceback. Only the error types a tool names are caught; anything else is a bug and
keeps its traceback."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def user_errors(tool: str, *kinds: type[Exception]) -> Iterator[None]:
    """Inside the block, an exception of one of `kinds` prints `tool: message` to stderr and raises SystemExit(2)."""
    try:
        yield
    except kinds as e:
        # str(KeyError("msg")) is "'msg'": print the message itself.
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"{tool}: {message}", file=sys.stderr)
        raise SystemExit(2) from None
