"""World modeling (paper §5, App. F.1): actions as text, CEM planning, trajectory metrics."""

from unimm.world_model.actions import Action, format_action, parse_action, wasd_action, wasd_actions
from unimm.world_model.cem import CEMConfig, CEMIteration, CEMResult, cem_plan
from unimm.world_model.trajectory_metrics import TrajectoryErrors, ate, integrate_actions, rpe, trajectory_errors

__all__ = [
    "Action", "format_action", "parse_action", "wasd_action", "wasd_actions",
    "CEMConfig", "CEMIteration", "CEMResult", "cem_plan",
    "TrajectoryErrors", "ate", "rpe", "trajectory_errors", "integrate_actions",
]
