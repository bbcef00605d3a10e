"""World modeling (paper §5, App. F.1): actions as text, rollouts, CEM planning, trajectory metrics."""

from unimm.world_model.actions import Action, format_action, parse_action, wasd_action, wasd_actions
from unimm.world_model.cem import CEMConfig, CEMIteration, CEMResult, cem_plan
from unimm.world_model.planner import PlannerConfig, PlanResult, SamplerWorldModel, plan, random_plans
from unimm.world_model.rollout import RolloutConfig, rollout
from unimm.world_model.trajectory_metrics import TrajectoryErrors, ate, integrate_actions, rpe, trajectory_errors

__all__ = [
    "Action", "format_action", "parse_action", "wasd_action", "wasd_actions",
    "CEMConfig", "CEMIteration", "CEMResult", "cem_plan",
    "PlannerConfig", "PlanResult", "SamplerWorldModel", "plan", "random_plans",
    "RolloutConfig", "rollout",
    "TrajectoryErrors", "ate", "rpe", "trajectory_errors", "integrate_actions",
]
