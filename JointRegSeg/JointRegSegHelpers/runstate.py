"""The module's run state machine and the texts it shows (Apply/Cancel button, progress bar).

idle -> starting (checking requirements, writing inputs) -> running (worker) -> loading (results
into the scene) -> idle; cancelling from starting or running; failed from any busy state; a new
Apply from failed starts again. The Apply button is "Cancel" while busy.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable


class RunState(enum.Enum):
    IDLE = "idle"
    STARTING = "starting"
    RUNNING = "running"
    CANCELLING = "cancelling"
    LOADING = "loading results"
    FAILED = "failed"


TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    RunState.IDLE: frozenset({RunState.STARTING}),
    RunState.STARTING: frozenset({RunState.RUNNING, RunState.CANCELLING, RunState.FAILED, RunState.IDLE}),
    RunState.RUNNING: frozenset({RunState.LOADING, RunState.CANCELLING, RunState.FAILED}),
    RunState.CANCELLING: frozenset({RunState.IDLE, RunState.FAILED}),
    RunState.LOADING: frozenset({RunState.IDLE, RunState.FAILED, RunState.STARTING}),
    RunState.FAILED: frozenset({RunState.STARTING, RunState.IDLE}),
}
BUSY = frozenset({RunState.STARTING, RunState.RUNNING, RunState.CANCELLING, RunState.LOADING})


class RunStateMachine:
    """Holds the current state, allows only the transitions in `TRANSITIONS`, tells listeners."""

    def __init__(self) -> None:
        self.state = RunState.IDLE
        self.listeners: list[Callable[[RunState, RunState], None]] = []

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


def apply_button(state: RunState) -> tuple[str, bool]:
    """Text and enabled state of the Apply/Cancel button in ``state``."""
    if state in (RunState.STARTING, RunState.RUNNING):
        return "Cancel", True
    if state == RunState.CANCELLING:
        return "Cancelling...", False
    if state == RunState.LOADING:
        return "Loading results...", False
    return "Apply", True


def format_duration(seconds: float | None) -> str:
    """Seconds as a short human text ('45 s', '3 min 05 s', '1 h 02 min'); '' when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return ""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def progress_text(stage: str, seconds_left: float | None) -> str:
    """The progress bar's text: stage, percentage (Qt fills in %p) and time left when known."""
    left = format_duration(seconds_left)
    text = f"{stage}: %p%" if stage else "%p%"
    return f"{text}, about {left} left" if left else text
