"""The one base class of errors a user causes and can fix: a bad model directory, a layout that cannot be
laid out, an absent device, a port in use, a bad placement or cluster file.

The ``moeserve`` command prints such an error as one line (``moeserve CMD: error: ...``) and exits 1; with
``-v`` it prints the traceback too. Anything else that escapes a command is a bug and keeps its traceback.
Typed errors of the lower layers (``ConfigError``, ``CheckpointError``, ``InfeasiblePlanError``,
``ClusterError``) derive from it besides their own builtin base.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the message says what is wrong and, where it helps, what to do."""
