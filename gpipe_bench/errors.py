"""The harness's one exception type for mistakes a user can fix.

Library code (configs, devices, results, data, measurements) raises
:class:`HarnessError` with one line naming the bad value and the fix; only the
command line knows about exit codes and click: it shows the line the way
click shows a usage error and exits 2. Anything else that escapes is a bug
and keeps its traceback.
"""

from __future__ import annotations

from typing import Optional

__all__ = ["HarnessError"]


class HarnessError(Exception):
    """A mistake the user can fix: one line naming the bad value and the fix (exit code 2 on the command line).

    ``param``: the option or argument at fault (``--devices``, ``MODEL``), when one is;
    the command line names it the way click names a bad parameter.
    """

    def __init__(self, message: str, param: Optional[str] = None) -> None:
        super().__init__(" ".join(message.splitlines()))
        self.param = param

    @property
    def message(self) -> str:
        return str(self.args[0])
