"""The reward model as one Serve deployment: FastAPI routes for HTTP, plain methods for handles.

  POST /v1/score   {merchant_id?, merchant_features?, merchant_stats?, prompt, images: [base64 PNG]}
                   -> {scores: [float], model_version, merchant_path}
  GET  /v1/version -> {model_version, model_dir, image_size}
  GET  /healthz    -> {status: "ok"} (open even when a token is set)
  handle.score.remote(prompt, images, merchant_fields) and handle.version.remote() for in-cluster callers.

Requests from both paths meet in one @serve.batch queue that counts images (not requests), so a batched
forward pass holds at most serve.max_batch_size images from however many requests. The forward pass
runs in a worker thread, so the event loop keeps reading and decoding the next requests meanwhile.

A new RM version arrives as a new user_config ({model_dir, ...}); Serve calls reconfigure() on the
running replicas in place, which loads the new directory beside the old one and swaps a single
reference. A batch scores with the model it started with and returns that model's version, so no
request fails and every score names the version that produced it.
"""

# No `from __future__ import annotations`: FastAPI must see the route annotations (Request) as classes.
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse
from ray import serve

from perfusion_ray.serve.batching import served_outcomes, unwrap
from perfusion_ray.serve.http import authorize, health_response, read_request, serving_host
from perfusion_ray.serve.images import array_images, decode_images
from perfusion_ray.serve.model_store import ServedModel, VersionedReplica, load_served_model
from perfusion_ray.serve.placement import PlacedReplica, replica_placement
from perfusion_ray.serve.openapi import REFUSALS, ingress_api, request_body
from perfusion_ray.serve.schemas import MerchantFields, ScoreRequest, ScoreResponse, VersionResponse, reject, validated
from perfusion_ray.serve.security import check_bind

DEPLOYMENT_NAME = "RewardModel"

api = ingress_api("PerFusion reward model", __doc__.splitlines()[0], [ScoreRequest])


@dataclass(frozen=True)
class RequestLimits:
    """What one request may carry and how batches form (from ServeConfig)."""

    max_images_per_request: int = 64
    max_body_bytes: int = 4 * 2**20
    max_image_side: int = 1024
    image_policy: str = "convert"
    max_batch_size: int = 64
    batch_wait_timeout_s: float = 0.005


@dataclass
class _Job:
    """One request's rows, queued for a batch."""

    merchant: MerchantFields
    images: np.ndarray


def _images_in(jobs: list[_Job]) -> int:
    return sum(len(job.images) for job in jobs)


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(api)
class RewardModel(VersionedReplica, PlacedReplica):
    """Model versions: VersionedReplica (user_config {model_dir, revision?, max_batch_size?, batch_wait_timeout_s?}).
    Device and dtype: PlacedReplica (serve.replica_gpus, serve.replica_dtype)."""

    FOLDER_KEY, WHAT, LOADER, BATCH_METHOD = "model_dir", "reward model", staticmethod(load_served_model), "_score_batch"

    def __init__(self, limits: dict, bearer_token: str | None = None, dtype: str = "float32"):
        import torch

        torch.set_num_threads(1)  # replicas get fractional CPUs on shared machines
        self._placement = replica_placement(dtype, "reward model")
        self.LOADER = partial(load_served_model, placement=self._placement)  # every version loads onto it
        self.limits = RequestLimits(**limits)
        self.token = bearer_token
        # Refuse to serve on a non-loopback proxy without a token, however the app was deployed
        # (`perfusion serve` checks before binding; `serve run`/`serve deploy` bind first).
        check_bind(serving_host(), self.token)
        self._served: ServedModel | None = None
        self._batching = (self.limits.max_batch_size, self.limits.batch_wait_timeout_s)
        self._scorer = ThreadPoolExecutor(1, thread_name_prefix="rm-score")

    # ------------------------------------------------------------ batched scoring
    @staticmethod
    def _score_jobs(served: ServedModel, jobs: list[_Job]) -> list[np.ndarray]:
        """Each job's scores from one forward pass over all their images."""
        from perfusion_ray.records import Merchant

        merchants, prompts = [], []
        for job in jobs:
            n = len(job.images)
            merchants += [Merchant(job.merchant.merchant_id or "", job.merchant.merchant_features,
                                   job.merchant.merchant_stats)] * n
            prompts += [job.merchant.prompt] * n
        images = np.concatenate([job.images for job in jobs])
        scores = served.model.score(merchants, prompts, images, batch_size=len(images))
        out, start = [], 0
        for job in jobs:
            out.append(scores[start:start + len(job.images)])
            start += len(job.images)
        return out

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005, batch_size_fn=_images_in)
    async def _score_batch(self, jobs: list[_Job]) -> list[tuple[np.ndarray | Exception, ServedModel]]:
        return await served_outcomes(self._scorer, self._served, self._score_jobs, jobs)

    async def _score(self, merchant: MerchantFields, images: np.ndarray) -> dict:
        outcome, served = await self._score_batch(_Job(merchant, images))
        scores = unwrap(outcome)  # a request that breaks the model fails alone, not its batch
        return {"scores": scores, "model_version": served.version,
                "merchant_path": served.merchant_path(merchant.merchant_id)}

    def _check_count(self, count: int) -> None:
        if count > self.limits.max_images_per_request:
            raise reject(422, "too_many_images", f"images: {count} in one request, the limit is "
                                                 f"{self.limits.max_images_per_request} (serve.max_images_per_request)")

    # ------------------------------------------------------------ handle path (in-cluster callers)
    async def score(self, prompt: str, images, merchant: dict | None = None) -> dict:
        """Same checks as HTTP except the token (the cluster is the trust boundary). images: uint8 arrays
        [N, H, W, 3] or a list of arrays / PNG bytes. Raises RewardRequestError."""
        fields = validated(MerchantFields, {**(merchant or {}), "prompt": prompt})
        self._check_count(len(images))
        arrays = array_images(images, self._served.image_size, self.limits.image_policy, self.limits.max_image_side)
        return await self._score(fields, arrays)

    def version(self) -> dict:
        served = self._served
        return {"model_version": served.version, "model_dir": served.model_dir, "image_size": served.image_size}

    # ------------------------------------------------------------ HTTP
    @api.post("/v1/score", openapi_extra=request_body(ScoreRequest),
              responses={200: {"model": ScoreResponse}, **REFUSALS})
    async def http_score(self, request: Request) -> JSONResponse:
        parsed = await read_request(request, ScoreRequest, self.token, self.limits.max_body_bytes,
                                    "serve.max_body_bytes")
        self._check_count(len(parsed.images))  # before decoding anything
        images = decode_images(parsed.images, self._served.image_size, self.limits.image_policy,
                               self.limits.max_image_side)
        result = await self._score(parsed, images)  # a ScoreRequest is the MerchantFields plus the images
        result["scores"] = result["scores"].tolist()
        return JSONResponse(result)

    @api.get("/v1/version", responses={200: {"model": VersionResponse}, 401: REFUSALS[401]})
    async def http_version(self, request: Request) -> JSONResponse:
        authorize(request, self.token)
        return JSONResponse(self.version())

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        return health_response(self._served)
