"""The run state machine every view shares, and what its Apply/Cancel button says in each state.

idle -> starting (writing inputs, launching) -> running (worker) -> loading (results into the scene)
-> idle; running -> cancelling -> idle; failed from any busy state; a new Apply from failed starts
again; idle -> installing (dependencies) -> idle or failed. The button is "Cancel" only while the
worker runs: starting, loading and installing cannot be interrupted, so it is disabled there.
"""

from __future__ import annotations

import enum
from typing import Callable


class RunState(enum.Enum):
    IDLE = "idle"
    INSTALLING = "installing dependencies"
    STARTING = "starting"
    RUNNING = "running"
    CANCELLING = "cancelling"
    LOADING = "loading results"
    FAILED = "failed"


TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    RunState.IDLE: frozenset({RunState.STARTING, RunState.INSTALLING}),
    RunState.INSTALLING: frozenset({RunState.IDLE, RunState.FAILED}),
    RunState.STARTING: frozenset({RunState.RUNNING, RunState.FAILED, RunState.IDLE}),
    RunState.RUNNING: frozenset({RunState.LOADING, RunState.CANCELLING, RunState.FAILED}),
    RunState.CANCELLING: frozenset({RunState.IDLE, RunState.FAILED}),
    RunState.LOADING: frozenset({RunState.IDLE, RunState.FAILED, RunState.STARTING}),
    RunState.FAILED: frozenset({RunState.STARTING, RunState.INSTALLING, RunState.IDLE}),
}
BUSY = frozenset({RunState.INSTALLING, RunState.STARTING, RunState.RUNNING, RunState.CANCELLING, RunState.LOADING})

Listener = Callable[[RunState, RunState], None]


class RunStateMachine:
    """Holds the current state, allows only the transitions in `TRANSITIONS`, tells listeners."""

    def __init__(self) -> None:
        self.state = RunState.IDLE
        self.listeners: list[Listener] = []

    @property
    def busy(self) -> bool:
        return self.state in BUSY

    def go(self, new: RunState) -> None:
        if new == self.state:
            return
        if new not in TRANSITIONS[self.state]:
            raise RuntimeError(f"JointRegSeg: cannot go from '{self.state.value}' to '{new.value}'.")
        old, self.state = self.state, new
        for listener in list(self.listeners):
            listener(old, new)


BUTTON: dict[RunState, tuple[str, bool]] = {
    RunState.IDLE: ("Apply", True),
    RunState.FAILED: ("Apply", True),
    RunState.INSTALLING: ("Installing...", False),
    RunState.STARTING: ("Starting...", False),
    RunState.RUNNING: ("Cancel", True),
    RunState.CANCELLING: ("Cancelling...", False),
    RunState.LOADING: ("Loading results...", False),
}


def apply_button(state: RunState) -> tuple[str, bool]:
    """Text and enabled state of the Apply/Cancel button in ``state`` (Apply still needs valid inputs)."""
    return BUTTON[state]
