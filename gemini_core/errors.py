"""The one exception type for mistakes a user can fix (config, data, CLI arguments).

The CLI prints its message alone and exits 2; a `TrainingStopped` (an unrecoverable fault,
a preemption) is printed alone too, with its own exit code; anything else is an internal
error (exit 1, with the traceback).
"""


class UserError(Exception):
    """A mistake in what the user gave us; the message names where (key path or file:line)."""

    exit_code = 2


class DamagedFile(UserError):
    """A file gx wrote earlier cannot be read back (truncated, not JSON, a folder in its place):
    damage from outside gx (a full disk, a copy cut short, a hand edit), since gx writes its
    records by write-then-rename. The message names the file and what to do."""

    def __init__(self, path, problem: str, remedy: str = ""):
        super().__init__(f"{path}: damaged ({problem})" + (f"; {remedy}" if remedy else ""))
        self.path = path
        self.problem = problem


class DamagedCheckpoint(UserError):
    """A checkpoint that cannot be read back whole (gemini_core.runs.checkpoint.verify)."""

    def __init__(self, path, step: int, problem: str, remedy: str = ""):
        super().__init__(f"{path}: checkpoint of step {step} is damaged ({problem})"
                         + (f"; {remedy}" if remedy else ""))
        self.path = path
        self.step = step
        self.problem = problem


class TrainingStopped(Exception):
    """Training stopped on purpose, with a message that says why and what to do (no traceback):
    a fault the trainer could not recover from (gemini_core.scale.faults), or a preemption."""

    exit_code = 1


class Preempted(TrainingStopped):
    """SIGTERM: the step finished, a checkpoint was written, the run is `preempted`; the same
    command resumes it. 143 = 128 + SIGTERM, what a shell reports for a process SIGTERM ended,
    so schedulers that restart interrupted jobs restart it and scripts tell it from done (0)."""

    exit_code = 143

    def __init__(self, step: int, checkpoint: str):
        super().__init__(f"preempted (SIGTERM): stopped after step {step}, checkpoint "
                         f"{checkpoint}; run the same command again to resume")
        self.step = step
