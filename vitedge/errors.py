"""User-facing errors.

Every problem a user can cause (bad file, wrong shape, unsupported model, missing backend) raises a
:class:`VitedgeError` whose message is one line: what is wrong, then how to fix it.  The CLI prints
it as ``error: ...`` and exits with code 2; a failed gate (validation) exits with code 1, a speed-up gate that
could not be checked because the machine was too busy to measure a speed-up with code 3.

The subclasses say what kind of problem it is, so callers and tests can catch one kind::

    VitedgeError (exit 2)
    ├── InputError            bad argument/option value
    │   ├── FileProblem       missing, unreadable or corrupt file
    │   ├── ModelNotSupported not a classic ViT, unsupported opset/operator
    │   └── ShapeMismatch     input shape does not fit the model/engine
    ├── BackendUnavailable    backend or device not installed/present
    └── GateFailed (exit 1)   a validation gate was missed
        └── SpeedupNotMeasurable (exit 3)  --min-speedup set, but the speed-up was withheld (busy machine)
"""

from __future__ import annotations

from typing import Any


class VitedgeError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        message = " ".join(str(message).split())
        if hint:
            message = f"{message} — {' '.join(hint.split())}"
        super().__init__(message)


class InputError(VitedgeError):
    """An argument or option value vitedge cannot use (bad number, unknown name, wrong suffix)."""


class FileProblem(InputError):
    """A file or folder the user named is missing, unreadable or corrupt."""


class ModelNotSupported(InputError):
    """The model is valid but not one vitedge handles (not a classic ViT, unsupported opset or operator)."""


class ShapeMismatch(InputError):
    """An input's shape (batch, channels, image size) does not match what the model or engine takes."""


class BackendUnavailable(VitedgeError):
    """A backend (e.g. TensorRT) or device (GPU) is not present on this machine."""


class GateFailed(VitedgeError):
    """A validation gate (max drop, min speed-up) was missed."""

    exit_code = 1
    report: Any  # the validation Report, set by validate() before raising: the CLI still prints its table


class SpeedupNotMeasurable(GateFailed):
    """``--min-speedup`` was set but the speed-up was withheld: other processes held the cores, so no ratio
    measured here could be trusted.  It fails closed, with its own exit code, so that a script can tell
    "too slow" (1) from "could not tell on this machine" (3)."""

    exit_code = 3


def first_line(exc: BaseException, limit: int = 240) -> str:
    """The first non-blank line of ``exc``'s message (at most ``limit`` characters), else its type name.

    Third-party libraries (OpenVINO, ONNX Runtime, TensorRT) raise errors with multi-line traces;
    vitedge shows only their first line.
    """
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(exc).__name__
