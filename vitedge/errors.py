"""User-facing errors.

Every problem a user can cause (bad file, wrong shape, unsupported model, missing backend) raises a
:class:`VitedgeError` whose message is one line: what is wrong, then how to fix it.  The CLI prints
it as ``error: ...`` and exits with code 2; a failed gate (validation) exits with code 1.
"""

from __future__ import annotations


class VitedgeError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        message = " ".join(str(message).split())
        if hint:
            message = f"{message} — {' '.join(hint.split())}"
        super().__init__(message)


class BackendUnavailable(VitedgeError):
    """A backend (e.g. TensorRT) or device (GPU) is not present on this machine."""


class GateFailed(VitedgeError):
    """A validation gate (max drop, min speed-up) was missed."""

    exit_code = 1
