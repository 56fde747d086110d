"""The design endpoint as one Serve deployment: PerFusionPipeline behind FastAPI routes and handle methods.

  POST /v1/designs   {merchant: {id, features, stats}, prompt, k?, n?, seed?} -> K candidates (design_schemas.py)
  POST /v1/feedback  {request_id, token, events: [{event_id, type, position, value?}]} -> accepted / duplicates
  GET  /v1/version   -> {model_version, pipeline_dir, image_size}
  GET  /v1/merchants -> FashionWorld merchants for the page's picker
  GET  /v1/images/<sha256> -> a stored candidate PNG
  GET  / (and /ui)   the merchant page (web/index.html); GET /healthz
  handle.design.remote(request_dict), handle.feedback.remote(request_dict), handle.version.remote()

Requests from every merchant meet in one @serve.batch queue that counts images; a batch is one pipeline
call whatever its merchants (the merchant is per-sample conditioning), unless design.batch_across_merchants
is false, then one call per merchant (the benchmark's baseline). Each request's starting noise comes from
its own seed, so an answer does not depend on what it was batched with. Every returned candidate is in the
store as an impression before the answer leaves (design_feedback.py); feedback is written, then acknowledged.

A new policy version arrives as a new user_config ({pipeline_dir, ...}); reconfigure() loads it beside the
old one and swaps one reference, so a batch runs on, and reports, the version it started with.
"""

# No `from __future__ import annotations`: FastAPI must see the route annotations (Request) as classes.
import asyncio
import base64
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from fastapi import Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve

from perfusion_ray.serve.design_feedback import DesignStore
from perfusion_ray.serve.design_limits import RateLimiter
from perfusion_ray.serve.design_schemas import DesignRequest, FeedbackEvent, FeedbackRequest
from perfusion_ray.serve.batching import served_outcomes, unwrap
from perfusion_ray.serve.http import authorize, health_response, read_request, refusal_response, serving_host
from perfusion_ray.serve.model_store import Served, VersionedReplica, local_model_dir, model_location, pipeline_version
from perfusion_ray.serve.placement import PlacedReplica, ReplicaPlacement, replica_placement
from perfusion_ray.records import Merchant
from perfusion_ray.serve.openapi import REFUSALS, Refusal, ingress_api, request_body
from perfusion_ray.serve.schemas import RewardRequestError, reject, validated
from perfusion_ray.serve.security import check_bind

DEPLOYMENT_NAME = "DesignModel"
WEB_PAGE = Path(__file__).parent / "web" / "index.html"
LOCK_STRIPES = 64

api = ingress_api("PerFusion design endpoint", __doc__.splitlines()[0], [DesignRequest, FeedbackRequest])


@dataclass(frozen=True)
class DesignSettings:
    """Everything the replica needs from the config (design_app.settings builds it)."""

    store_root: str
    split: str
    group_size: int
    max_k: int
    any_k: bool
    best_of_n: int
    max_n: int
    reward_app: str
    max_body_bytes: int
    max_events_per_feedback: int
    rate_limit_per_minute: float
    rate_limit_burst: int
    batch_across_merchants: bool
    max_batch_size: int
    batch_wait_timeout_s: float
    num_inference_steps: int
    guidance_scale: float
    personalize_unconditional: bool
    route_prefix: str
    merchants: tuple = ()  # [{id, features, stats, cold_start}] offered by the page
    dtype: str = "float32"  # design.replica_dtype


@dataclass
class _Job:
    """One request's images, queued for a batch."""

    merchant: Merchant
    prompt: str
    n: int
    seed: int


def _images_in(jobs: list[_Job]) -> int:
    return sum(job.n for job in jobs)


def load_served_pipeline(folder: str, placement: ReplicaPlacement | None = None) -> Served:
    """Load with one torch thread, on placement's device and dtype (None: CPU, float32), and pay the first-call
    warm-up before traffic arrives."""
    import torch

    from perfusion_ray.models.pipeline import PerFusionPipeline

    torch.set_num_threads(1)
    location, folder = model_location(folder), local_model_dir(folder)
    dtype = placement.torch_dtype if placement else torch.float32
    pipeline = PerFusionPipeline.from_pretrained(str(folder), dtype=dtype)
    if dtype == torch.float16 and getattr(pipeline.vae.config, "force_upcast", False):
        pipeline.vae.to(torch.float32)  # the VAE overflows in float16 (SDXL's); it decodes in float32 (as diffusers)
    if placement is not None:
        pipeline.to(placement.device)
    pipeline.set_progress_bar_config(disable=True)
    pipeline(["warm-up"], merchant=[{"merchant_id": "warm-up"}], num_inference_steps=1, output_type="np",
             generator=torch.Generator().manual_seed(0))
    return Served(pipeline, pipeline_version(location), location, pipeline.base.image_size)


def generate(served: Served, jobs: list[_Job], settings: DesignSettings) -> list[np.ndarray]:
    """uint8 [n, H, W, 3] per job from one pipeline call; each job's noise comes from its own seed."""
    import torch

    pipe = served.model
    shape = pipe.base.latent_shape
    latents = torch.cat([torch.randn((job.n, *shape), generator=torch.Generator().manual_seed(job.seed))
                         for job in jobs])
    per_image = [job for job in jobs for _ in range(job.n)]
    images = pipe([j.prompt for j in per_image], merchant=[j.merchant for j in per_image], latents=latents, output_type="np",
                  num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
                  personalize_unconditional=settings.personalize_unconditional, batch_size=len(per_image)).images
    out, start = [], 0
    for job in jobs:
        out.append(images[start:start + job.n])
        start += job.n
    return out


def _merchant_groups(jobs: list[_Job]) -> list[list[int]]:
    """Job indices grouped by merchant id, in first-seen order."""
    groups: dict[str, list[int]] = {}
    for index, job in enumerate(jobs):
        groups.setdefault(job.merchant.id, []).append(index)
    return list(groups.values())


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress(api)
class DesignModel(VersionedReplica, PlacedReplica):
    """Policy versions: VersionedReplica (user_config {pipeline_dir, revision?, max_batch_size?,
    batch_wait_timeout_s?}). Device and dtype: PlacedReplica (design.replica_gpus, design.replica_dtype)."""

    FOLDER_KEY, WHAT, LOADER, BATCH_METHOD = ("pipeline_dir", "design policy", staticmethod(load_served_pipeline),
                                              "_generate_batch")

    def __init__(self, settings: dict, bearer_token: str | None = None):
        import torch

        torch.set_num_threads(1)  # replicas get fractional CPUs on shared machines
        self.settings = DesignSettings(**settings)
        self._placement = replica_placement(self.settings.dtype, "design policy")
        self.LOADER = partial(load_served_pipeline, placement=self._placement)  # every version loads onto it
        self.token = bearer_token
        check_bind(serving_host(), self.token, what="the design endpoint")
        self.store = DesignStore(self.settings.store_root, self.settings.split)
        self.limiter = RateLimiter(self.settings.rate_limit_per_minute, self.settings.rate_limit_burst)
        self._served: Served | None = None
        self._batching = (self.settings.max_batch_size, self.settings.batch_wait_timeout_s)
        self._generator = ThreadPoolExecutor(1, thread_name_prefix="design-generate")
        self._locks = [asyncio.Lock() for _ in range(LOCK_STRIPES)]
        self._ranker = None
        self.batches: list[int] = []  # pipeline calls' image counts, newest last (bounded; for tests/benchmarks)

    # ------------------------------------------------------------ batched generation
    def _run(self, served: Served, jobs: list[_Job]) -> list[np.ndarray]:
        if self.settings.batch_across_merchants:
            groups = [list(range(len(jobs)))]
        else:
            groups = _merchant_groups(jobs)
        out: list = [None] * len(jobs)
        for group in groups:
            for index, images in zip(group, generate(served, [jobs[i] for i in group], self.settings)):
                out[index] = images
            self.batches = (self.batches + [sum(jobs[i].n for i in group)])[-1000:]
        return out

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.02, batch_size_fn=_images_in)
    async def _generate_batch(self, jobs: list[_Job]) -> list[tuple[np.ndarray | Exception, Served]]:
        return await served_outcomes(self._generator, self._served, self._run, jobs)

    # ------------------------------------------------------------ designs
    def _sizes(self, request: DesignRequest) -> tuple[int, int]:
        s = self.settings
        k = request.k or s.group_size
        if k > s.max_k:
            raise reject(422, "k_too_large", f"k: {k}, the limit is {s.max_k} (design.max_k)")
        if k != s.group_size and not s.any_k:
            raise reject(422, "k_not_group_size", f"k: {k}, this endpoint serves groups of {s.group_size} "
                                                  f"(data.group_size), the size ingest reads (design.any_k allows "
                                                  f"others)")
        n = request.n or max(k, s.best_of_n)
        if n < k:
            raise reject(422, "n_below_k", f"n: {n} images cannot give k={k} candidates (n >= k)")
        if n > s.max_n:
            raise reject(422, "n_too_large", f"n: {n}, the limit is {s.max_n} images per request (design.max_n)")
        return k, n

    async def _rank(self, request: DesignRequest, images: np.ndarray, k: int) -> tuple[np.ndarray, list, str]:
        """The k best of n by the reward app: (order, their scores, RM version)."""
        from perfusion_ray.serve.client import RewardHandleClient

        if self._ranker is None:
            self._ranker = RewardHandleClient(self.settings.reward_app)
        result = await self._ranker.score_async(request.prompt, images, request.merchant.as_merchant())
        order = np.argsort(-result.scores, kind="stable")[:k]
        return order, [float(result.scores[i]) for i in order], result.model_version

    async def _design(self, request: DesignRequest) -> dict:
        from perfusion_ray.data.image_store import encode_png

        k, n = self._sizes(request)
        wait = self.limiter.acquire(request.merchant.id)
        if wait is not None:
            raise reject(429, "rate_limited", f"merchant {request.merchant.id!r} is over "
                                              f"{self.settings.rate_limit_per_minute:g} designs per minute "
                                              f"(design.rate_limit_per_minute); retry in {wait:.1f}s", wait)
        seed = request.seed if request.seed is not None else secrets.randbits(63)
        merchant = request.merchant.as_merchant()
        outcome, served = await self._generate_batch(_Job(merchant, request.prompt, n, seed))
        images = unwrap(outcome)  # a request that breaks the pipeline fails alone, not its batch
        scores, reward_version = None, None
        if n > k:
            order, scores, reward_version = await self._rank(request, images, k)
            images = images[order]
        pngs = [encode_png(image) for image in images]
        record, token = await asyncio.to_thread(self.store.log_request, merchant, request.prompt, pngs, served.version,
                                                seed, n, scores, reward_version)
        prefix = self.settings.route_prefix.rstrip("/")
        return {"request_id": record.request_id, "token": token, "model_version": served.version, "seed": seed,
                "k": k, "n": n, "reward_version": reward_version,
                "candidates": [{"position": c.position, "image": png, "sha256": c.image_sha256,
                                "url": f"{prefix}/v1/images/{c.image_sha256}", "score": c.score}
                               for c, png in zip(record.candidates, pngs)]}

    async def _feedback(self, request: FeedbackRequest) -> dict:
        if len(request.events) > self.settings.max_events_per_feedback:
            raise reject(422, "too_many_events", f"events: {len(request.events)} in one request, the limit is "
                                                 f"{self.settings.max_events_per_feedback} "
                                                 f"(design.max_events_per_feedback)")
        record = await asyncio.to_thread(self.store.authorized_request, request.request_id, request.token)
        events = [FeedbackEvent(e.type, e.position, e.event_id, e.value) for e in request.events]
        async with self._locks[hash(request.request_id) % LOCK_STRIPES]:
            result = await asyncio.to_thread(self.store.append_feedback, record, events)
        return {"request_id": result.request_id, "accepted": result.accepted, "duplicates": result.duplicates}

    # ------------------------------------------------------------ handle path (in-cluster callers)
    async def design(self, request: dict) -> dict:
        """Same checks as HTTP except the bearer token; candidates carry PNG bytes. Raises RewardRequestError."""
        return await self._design(validated(DesignRequest, request))

    async def feedback(self, request: dict) -> dict:
        return await self._feedback(validated(FeedbackRequest, request))

    def version(self) -> dict:
        served = self._served
        return {"model_version": served.version, "pipeline_dir": served.model_dir, "image_size": served.image_size}

    def batch_sizes(self) -> list[int]:
        """Images per pipeline call in this replica, newest last (tests and benchmarks read it)."""
        return list(self.batches)

    # ------------------------------------------------------------ HTTP
    async def _http(self, request: Request, model, handler) -> JSONResponse:
        parsed = await read_request(request, model, self.token, self.settings.max_body_bytes, "design.max_body_bytes")
        result = await handler(parsed)
        for candidate in result.get("candidates", []):
            candidate["image"] = base64.b64encode(candidate["image"]).decode("ascii")
        return JSONResponse(result)

    @api.post("/v1/designs", openapi_extra=request_body(DesignRequest),
              responses={**REFUSALS, 429: {"model": Refusal, "description": "this merchant is over its rate"}})
    async def http_designs(self, request: Request) -> JSONResponse:
        return await self._http(request, DesignRequest, self._design)

    @api.post("/v1/feedback", openapi_extra=request_body(FeedbackRequest),
              responses={**REFUSALS, **{status: {"model": Refusal, "description": text} for status, text in (
                  (403, "the token is not this request's"), (404, "no such request"),
                  (409, "an event id stored before with other content"))}})
    async def http_feedback(self, request: Request) -> JSONResponse:
        return await self._http(request, FeedbackRequest, self._feedback)

    async def _authorized_json(self, request: Request, body) -> Response:
        try:
            authorize(request, self.token)
        except RewardRequestError as exc:
            return refusal_response(exc)
        return JSONResponse(body() if callable(body) else body)

    @api.get("/v1/version")
    async def http_version(self, request: Request) -> Response:
        return await self._authorized_json(request, self.version)

    @api.get("/v1/merchants")
    async def http_merchants(self, request: Request) -> Response:
        return await self._authorized_json(request, {"merchants": list(self.settings.merchants)})

    @api.get("/v1/images/{digest}")
    async def http_image(self, digest: str, request: Request) -> Response:
        try:
            authorize(request, self.token)
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise reject(404, "unknown_image", f"{digest!r} is not an image sha256")
            data = await asyncio.to_thread(self.store.image_bytes, f"{digest[:2]}/{digest}.png")
        except FileNotFoundError:
            return refusal_response(reject(404, "unknown_image", f"no stored image {digest}"))
        except RewardRequestError as exc:
            return refusal_response(exc)
        return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=31536000, immutable"})

    @api.get("/")
    @api.get("/ui")
    async def page(self) -> HTMLResponse:
        return HTMLResponse(WEB_PAGE.read_text())

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        return health_response(self._served)
