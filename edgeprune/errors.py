"""Errors that reach the user as one line and a distinct exit code.

Every user-facing failure is an :class:`EdgepruneError` subclass; the CLI prints ``error: <message>`` and
exits with the class's ``exit_code``. Exit code 1 is reserved for budget violations (``edgeprune check``),
so CI can tell "the model regressed" from "the command was used wrongly".
"""
from __future__ import annotations


class EdgepruneError(Exception):
    """Base class: a one-line message naming what was wrong and what to do."""

    exit_code = 2


class ConfigError(EdgepruneError):
    """Bad option, target profile, plan or budget file (caught before any heavy work)."""

    exit_code = 2


class DataError(EdgepruneError):
    """Missing or malformed task data (names the file, line and problem)."""

    exit_code = 3


class ModelError(EdgepruneError):
    """Missing or incompatible checkpoint."""

    exit_code = 4


class ExportError(EdgepruneError):
    """ONNX export, optimisation or quantization failed, or parity with PyTorch was lost."""

    exit_code = 5


class BudgetError(EdgepruneError):
    """One or more budgets of the target were violated."""

    exit_code = 1


class EmulationError(EdgepruneError):
    """The machine cannot run the arm64 emulation (not root, no binfmt_misc, no qemu), or its set-up failed."""

    exit_code = 6
