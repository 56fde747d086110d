"""perfusion_ray: personalized, group-level preference alignment of text-to-image diffusion on Ray."""

__version__ = "0.1.0"

# Environment hygiene before anything imports Ray (which binds loopback only if told so at import time).
from perfusion_ray.runtime import configure_environment as _configure_environment  # noqa: E402

_configure_environment()

# Classes that diffusers' DiffusionPipeline.from_pretrained looks up by name on this package (a saved
# model_index.json names "perfusion_ray"), imported lazily so the CLI starts fast.
_LAZY = {
    "PerFusionPipeline": "perfusion_ray.models.pipeline",
    "PersonalizedAdapter": "perfusion_ray.models.adaptive",
    "TinyAutoencoder": "perfusion_ray.models.autoencoder",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'perfusion_ray' has no attribute {name!r}")
