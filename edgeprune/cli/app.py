"""The ``edgeprune`` group: every failure is one ``error:`` line with a distinct exit code
(:mod:`edgeprune.errors`), Ctrl-C and SIGTERM end a command with one line after the atomic writes cleaned up.

The command line is thin: each command parses its options into the config objects of the library and calls one
function of it. This module and the option declarations import neither torch nor transformers nor onnxruntime;
the commands import what they need when they run, so ``--help``, ``targets``, ``tasks`` and option errors answer
at once.
"""
from __future__ import annotations

import os

import click

from edgeprune.errors import EdgepruneError

# Models and data come from local directories only: never from a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

INTERRUPTED = 130  # the shell's code for a command ended by SIGINT
INTERNAL = 70  # EX_SOFTWARE: a failure edgeprune did not anticipate (a bug to report)
BROKEN_PIPE = 141  # the shell's code for a command whose output pipe closed (128 + SIGPIPE)


def _sigterm(signum, frame):
    raise KeyboardInterrupt


class Group(click.Group):
    """Every failure is one ``error:`` line with its exit code (see :mod:`edgeprune.errors`); Ctrl-C and
    SIGTERM end the command with one line, after the atomic writes have cleaned up (the previous artifact
    and the cache stay as they were). ``EDGEPRUNE_DEBUG=1`` shows the traceback of an unexpected failure."""

    def invoke(self, ctx: click.Context):
        import signal

        previous = signal.signal(signal.SIGTERM, _sigterm)
        try:
            return super().invoke(ctx)
        except EdgepruneError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except BrokenPipeError:  # the reader went away (`edgeprune families | head`): nothing to say to it
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            ctx.exit(BROKEN_PIPE)
        except KeyboardInterrupt:
            click.echo("error: interrupted; nothing was written (the previous output and the cache are as they were)",
                       err=True)
            ctx.exit(INTERRUPTED)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort, SystemExit):
            raise
        except Exception as exc:
            if os.environ.get("EDGEPRUNE_DEBUG"):
                raise
            msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            click.echo(f"error: unexpected {type(exc).__name__}: {msg} (a bug: please report it with the command; "
                       "EDGEPRUNE_DEBUG=1 shows the traceback)", err=True)
            ctx.exit(INTERNAL)
        finally:
            signal.signal(signal.SIGTERM, previous)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgeprune")
def main() -> None:
    """Prune a task-fine-tuned Mixture-of-Experts into a small, fast ONNX model for an edge target,
    and prove it against the original."""
