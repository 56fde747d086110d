"""perfusion_ray: personalized, group-level preference alignment of text-to-image diffusion on Ray."""

__version__ = "0.1.0"

# Environment hygiene before anything imports Ray (which binds loopback only if told so at import time).
from perfusion_ray.runtime import configure_environment as _configure_environment  # noqa: E402

_configure_environment()

