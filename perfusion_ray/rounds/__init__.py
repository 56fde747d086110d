"""The online alignment rounds' driver-side pieces: the round state, the planner (fresh feedback past the
watermark and the round's requests), the endpoint roll-outs and the metrics sink. The controller that
ties them to the worker group is perfusion_ray/coordinator.py."""
