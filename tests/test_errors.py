"""The error hierarchy and the one-line helper."""

import pytest

from vitedge.errors import FileProblem, GateFailed, InputError, ModelNotSupported, ShapeMismatch, VitedgeError, first_line


def test_first_line():
    assert first_line(RuntimeError("\n  first problem  \nstack line 1\nstack line 2")) == "first problem"
    assert first_line(RuntimeError("x" * 500)) == "x" * 240
    assert first_line(RuntimeError("x" * 500), 10) == "x" * 10
    assert first_line(KeyError()) == "KeyError"
    assert first_line(ValueError("  \n ")) == "ValueError"


@pytest.mark.parametrize("cls", [InputError, FileProblem, ModelNotSupported, ShapeMismatch])
def test_kinds_are_input_errors_with_exit_code_2(cls):
    err = cls("a.onnx is broken", "re-export it")
    assert isinstance(err, VitedgeError) and isinstance(err, InputError)
    assert err.exit_code == 2 and str(err) == "a.onnx is broken — re-export it"
    assert GateFailed("missed").exit_code == 1
