"""Pure loss functions (no Ray, no I/O): group preference objectives for the generator and the
ranking losses for the reward model, which share one Plackett-Luce implementation."""

from perfusion_ray.objectives.group_preference import GroupLoss, group_preference_loss, group_preference_terms
from perfusion_ray.objectives.ranking import pairwise_logistic_loss, plackett_luce_loss

__all__ = ["GroupLoss", "group_preference_loss", "group_preference_terms", "pairwise_logistic_loss",
           "plackett_luce_loss"]
