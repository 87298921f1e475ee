"""Typed errors raised by the sw-onnx library; the CLI alone turns them into messages and exit codes."""

from __future__ import annotations


class SwOnnxError(Exception):
    """Base class of every error sw-onnx raises on purpose.

    Attributes:
        hint: one short sentence telling the user what to do about it, or "".
    """

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


class UsageError(SwOnnxError):
    """A bad option or option combination."""

    exit_code = 2


class ModelLoadError(SwOnnxError):
    """The path does not hold a readable ONNX model."""


class UnsupportedGraphError(SwOnnxError):
    """The model loads but sw-onnx cannot work on it (no linear layer, unsupported opset...)."""


class VerificationError(SwOnnxError):
    """An output was written to a temporary path but failed verification."""

    exit_code = 3
