"""Navigation actions as the model reads them: plain text (paper §5, App. F.1, G.3).

Two kinds of action reach the model:

* numeric moves (dx, dy, dyaw) in the robot frame (+x forward, +y left, yaw counter-clockwise,
  metres and radians), written by the data jobs' own formatter
  `unimm.data_pipelines.poses.action_text` ("dx +0.50 dy +0.00 dyaw -0.50"). `format_action`
  calls that very function, so a planner's prompt is byte-identical to what training saw;
* free-form text (annotated video, App. G.3: "the person opens the fridge"), kept verbatim.

WASD keys (App. F.1) are the numeric moves in `unimm.data_pipelines.poses.WASD`:
W (+0.5, 0, 0), S (-0.5, 0, 0), A (+0.2, 0, +0.5), D (+0.2, 0, -0.5).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from unimm.data_pipelines.poses import WASD, action_text

__all__ = ["Action", "format_action", "parse_action", "wasd_action", "wasd_actions", "WASD"]

_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_NUMERIC = re.compile(rf"dx ({_NUMBER}) dy ({_NUMBER}) dyaw ({_NUMBER})")
# Text that means to be a numeric action (so a typo is an error, not a free-form action).
_LOOKS_NUMERIC = re.compile(r"\s*dx\b")


@dataclass(frozen=True)
class Action:
    """One action: either numbers (dx, dy, dyaw) or free-form text, never both.

    `Action(0.5, 0.0, 0.0)` is numeric; `Action.free("open the door")` is free-form.
    """

    dx: float | None = None
    dy: float | None = None
    dyaw: float | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        numbers = (self.dx, self.dy, self.dyaw)
        if self.text is not None:
            if any(v is not None for v in numbers):
                raise ValueError(f"an action is numbers or text, not both: {self!r}")
            if not isinstance(self.text, str) or not self.text.strip():
                raise ValueError(f"a free-form action needs non-empty text, got {self.text!r}")
            return
        if any(v is None for v in numbers):
            raise ValueError(f"a numeric action needs dx, dy and dyaw, got {numbers}")
        values = []
        for v in numbers:
            try:
                f = float(v)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"action values must be numbers, got {numbers!r}") from exc
            if not math.isfinite(f):
                raise ValueError(f"action values must be finite, got {numbers!r}")
            values.append(f)
        object.__setattr__(self, "dx", values[0])
        object.__setattr__(self, "dy", values[1])
        object.__setattr__(self, "dyaw", values[2])

    @classmethod
    def free(cls, text: str) -> Action:
        return cls(text=text)

    @property
    def is_numeric(self) -> bool:
        return self.text is None

    @property
    def values(self) -> tuple[float, float, float]:
        """(dx, dy, dyaw); a ValueError for a free-form action."""
        if self.text is not None:
            raise ValueError(f"free-form action {self.text!r} has no (dx, dy, dyaw)")
        return (self.dx, self.dy, self.dyaw)  # type: ignore[return-value]


def _as_action(action: Action | Sequence[float] | str) -> Action:
    if isinstance(action, Action):
        return action
    if isinstance(action, str):
        return Action.free(action)
    try:
        dx, dy, dyaw = action
    except (TypeError, ValueError) as exc:
        raise ValueError(f"an action is Action, (dx, dy, dyaw) or text, got {action!r}") from exc
    return Action(dx, dy, dyaw)


def format_action(action: Action | Sequence[float] | str) -> str:
    """The text the model sees: `poses.action_text` for numbers (2 decimals, explicit sign, no
    "-0.00"), the text itself for a free-form action."""
    a = _as_action(action)
    if a.text is not None:
        return a.text
    return action_text(a.values)


def parse_action(text: str) -> Action:
    """Inverse of `format_action`.

    Text starting with the word "dx" must be a whole numeric action "dx <n> dy <n> dyaw <n>"
    (the values come back with the text's precision: 2 decimals from the data jobs); anything
    else non-empty is a free-form action, kept verbatim. Raises ValueError naming the text for
    empty text, a malformed numeric action or non-finite numbers.
    """
    if not isinstance(text, str):
        raise ValueError(f"an action text must be a string, got {text!r}")
    if not text.strip():
        raise ValueError(f"empty action text {text!r}")
    if _LOOKS_NUMERIC.match(text):
        m = _NUMERIC.fullmatch(text.strip())
        if m is None:
            raise ValueError(f"malformed numeric action {text!r}: expected 'dx <number> dy <number> dyaw <number>', "
                             f"e.g. {action_text((0.5, 0.0, -0.5))!r}")
        return Action(*(float(g) for g in m.groups()))
    return Action.free(text)


def wasd_action(key: str) -> Action:
    """The move for one WASD key (App. F.1), case-insensitive; ValueError naming an unknown key."""
    if not isinstance(key, str) or key.upper() not in WASD:
        raise ValueError(f"unknown WASD key {key!r}: expected one of W, A, S, D")
    return Action(*WASD[key.upper()])


def wasd_actions(keys: str) -> list[Action]:
    """A key sequence such as "WWAD" (spaces ignored) as one action per key."""
    if not isinstance(keys, str):
        raise ValueError(f"WASD keys must be a string, got {keys!r}")
    letters = keys.replace(" ", "")
    if not letters:
        raise ValueError(f"no WASD keys in {keys!r}")
    bad = [k for k in letters if k.upper() not in WASD]
    if bad:
        raise ValueError(f"unknown WASD key {bad[0]!r} in {keys!r}: expected only W, A, S, D")
    return [wasd_action(k) for k in letters]
