"""The reward model as a Ray Serve application.

One module per concern:
  schemas.py     the request/response contract (pydantic, unknown fields refused) and typed results
  images.py      base64 PNG -> RGB arrays, with the configured size/mode policy
  security.py    loopback binding and bearer tokens
  model_store.py loading an RM directory with the version every score carries
  deployment.py  the Serve deployment: @serve.batch scoring, FastAPI routes, in-place reconfigure
  reward_app.py  build_app(args) for `serve run`/`serve deploy`, the declarative config, deploy and roll out
  client.py      RewardClient (HTTP) and RewardHandleClient (DeploymentHandle), one signature
  http.py, fields.py, openapi.py  the one request-parsing path, its strict field types, the served OpenAPI
  batching.py    a batch that raises runs again request by request (one bad request fails alone)
  retry.py, proxy_middleware.py   replica loss: client retries; 503 + Retry-After from Serve's proxy
  replica_drill.py                 kill one replica under load and measure what clients saw

Nothing here imports ray or torch at package import time.
"""

from perfusion_ray.records import Merchant
from perfusion_ray.serve.schemas import RewardRequestError, ScoreResult

__all__ = ["Merchant", "RewardRequestError", "ScoreResult"]
