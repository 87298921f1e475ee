"""Typed errors raised by the sw-onnx library; the CLI alone turns them into messages and exit codes.

Exit codes of the `sw-onnx` command (also in the README and `sw_onnx.cli`):

====  ==============================================================================================
0     success (also "no super weight found")
1     the model: missing, not ONNX, corrupt, unsafe external data, unsupported opset, no linear layer,
      already quantized, onnxruntime cannot run it (`ModelLoadError`, `UnsupportedGraphError`)
2     usage: a bad option or combination, an output that would overwrite the input or exists without
      ``--force``, a ``--keep`` report for another model (`UsageError`)
3     verification of a written model failed; nothing was published (`VerificationError`)
4     an output could not be written (disk full, permission, read-only; `OutputWriteError`): nothing
      partial is left and a previous file at that path is unchanged; also any other OS-level I/O error
5     internal error: a bug in sw-onnx (the message says so; ``SW_ONNX_DEBUG=1`` shows the traceback)
130   interrupted (Ctrl-C)
====  ==============================================================================================
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_MODEL = 1
EXIT_USAGE = 2
EXIT_VERIFICATION = 3
EXIT_OUTPUT = 4
EXIT_INTERNAL = 5
EXIT_INTERRUPTED = 130


class SwOnnxError(Exception):
    """Base class of every error sw-onnx raises on purpose.

    Attributes:
        hint: one short sentence telling the user what to do about it, or "".
        exit_code: the CLI's exit status for it.
    """

    exit_code = EXIT_MODEL

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


class UsageError(SwOnnxError):
    """A bad option or option combination."""

    exit_code = EXIT_USAGE


class ModelLoadError(SwOnnxError):
    """The path does not hold a readable ONNX model."""


class UnsafeModelError(ModelLoadError):
    """The model references external data outside its folder (absolute path, ``..``, symlink, hard link);
    the reference is refused and never read."""


class UnsupportedGraphError(SwOnnxError):
    """The model loads but sw-onnx cannot work on it (no linear layer, unsupported opset...)."""


class AlreadyQuantizedError(UnsupportedGraphError):
    """The model is already quantized (QDQ weights, MatMulNBits, QLinear/integer ops)."""


class VerificationError(SwOnnxError):
    """An output was written to a temporary path but failed verification."""

    exit_code = EXIT_VERIFICATION


class OutputWriteError(SwOnnxError):
    """An output could not be written (disk full, permission denied); nothing partial was left behind."""

    exit_code = EXIT_OUTPUT
