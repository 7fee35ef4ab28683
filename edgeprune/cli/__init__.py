"""The ``edgeprune`` command line: a thin click layer over the library, a module per group of commands.

* :mod:`.app`: the group, its one-line errors and exit codes;
* :mod:`.options`: option stacks declared once and shared (data, originals, pruning with the methods' own
  options, structure and recovery) and the output guards;
* :mod:`.originals` (upcycle, original, baseline), :mod:`.pruning` (score, prune), :mod:`.build` (build,
  search), :mod:`.artifacts` (check, predict, generate, serve, export-lm), :mod:`.listing` (families, tasks,
  targets), :mod:`.emulate` (emulate setup, validate --on arm64).

Importing it does not import torch, transformers or onnxruntime (tests/test_cli_imports.py holds it to that).
"""
from edgeprune.cli.app import main
from edgeprune.cli import artifacts, build, emulate, listing, originals, pruning  # noqa: F401  (register the commands)

__all__ = ["main"]
