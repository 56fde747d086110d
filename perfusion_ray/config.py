"""Typed configuration: YAML files plus dotted `--set section.field=value` overrides.

One `PerfusionConfig` with the sections world, data, rm, policy, align, serve, cluster. Every model
forbids unknown keys, so a typo fails at load with the field and the file named, instead of being
silently ignored. Paths to *inputs* (taste families) are resolved relative to the config file that
names them; paths to *outputs* (data.root) are taken as given, relative to the working directory.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from perfusion_ray.errors import PerfusionError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "fashionworld.yaml"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# ---------------------------------------------------------------- world
class OmitProbability(Section):
    """Probability that a prompt leaves each attribute out (the item's class is always named)."""

    colour: float = Field(0.5, ge=0, le=1, description="chance a prompt leaves the colour out")
    shade: float = Field(0.5, ge=0, le=1, description="chance a prompt leaves the shade (light/dark) out")
    pattern: float = Field(0.5, ge=0, le=1, description="chance a prompt leaves the pattern out")


class ShopperModel(Section):
    """Shoppers react to listed (selected) items; probabilities rise with the merchant's utility."""

    views_per_listing: int = Field(4, ge=0, description="shopper visits per listed item")
    click_rate: float = Field(0.5, ge=0, le=1, description="click probability at utility 0")
    order_rate: float = Field(0.4, ge=0, le=1, description="order probability per click at utility 0")
    return_rate: float = Field(0.3, ge=0, le=1, description="return probability per order at utility 0")
    utility_slope: float = Field(2.0, ge=0, description="logit slope of every rate in the utility")


class WorldConfig(Section):
    """FashionWorld: catalogue, merchants and the feedback simulator."""

    seed: int = Field(0, description="one seed for catalogue, merchants and feedback: same seed, same bytes")
    fashion_mnist_dir: Path | None = Field(None, description="folder with the idx files; else the locator searches")
    taste_family: Path = Field(Path("tastes/boutique.yaml"), description="merchant segments and tastes (YAML)")
    image_size: int = Field(32, ge=28, le=256, description="rendered images are image_size x image_size RGB")
    items_per_combination: int = Field(6, ge=1, description="catalogue items per (class, colour, shade, pattern)")
    num_merchants: int = Field(48, ge=2, description="merchants in the world, seen and cold start")
    cold_start_fraction: float = Field(0.25, gt=0, lt=1, description="merchants held out of the training stream")
    hours: int = Field(12, ge=1, description="hours of training feedback, one partition per hour")
    requests_per_hour: int = Field(60, ge=1, description="requests of seen merchants per hour of training feedback")
    holdout_requests_per_merchant: int = Field(12, ge=1, description="held-out requests, seen and cold merchants")
    start_time: dt.datetime = Field(dt.datetime(2026, 1, 5, tzinfo=dt.timezone.utc), description="first event hour (UTC)")
    selection_temperature: float = Field(0.15, gt=0, description="Plackett-Luce temperature of the merchant's picks")
    min_selected: int = Field(1, ge=1, description="candidates a merchant selects from a group, at least")
    max_selected: int = Field(2, ge=1, description="candidates a merchant selects from a group, at most")
    omit: OmitProbability = OmitProbability()
    shoppers: ShopperModel = ShopperModel()
    faulty_event_rate: float = Field(
        0.0, ge=0, le=0.5,
        description="share of events written broken (unknown type, NaN value, bad time, resent duplicate), "
                    "as real logs have; ingest must quarantine them")

    @field_validator("start_time")
    @classmethod
    def _utc(cls, value: dt.datetime) -> dt.datetime:
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)

    @model_validator(mode="after")
    def _selection_range(self) -> "WorldConfig":
        if self.max_selected < self.min_selected:
            raise ValueError(f"max_selected ({self.max_selected}) is below min_selected ({self.min_selected})")
        return self


# ---------------------------------------------------------------- data
class LabelPolicy(Section):
    """How feedback events grade a candidate: label = max grade of its events + return_penalty per return."""

    grades: dict[Literal["impression", "select", "click", "order"], float] = Field(
        default_factory=lambda: {"impression": 0.0, "select": 1.0, "click": 2.0, "order": 3.0},
        description="grade of each event type; a candidate's label is the highest grade among its events")
    return_penalty: float = Field(-2.0, le=0, description="added once per return event; a return counts against")
    positive_threshold: float = Field(0.5, description="label > threshold puts a candidate in P, else in N")

    @field_validator("grades")
    @classmethod
    def _impression_graded(cls, grades: dict[str, float]) -> dict[str, float]:
        if "impression" not in grades:
            raise ValueError("grades must include 'impression' (the grade of an unpicked candidate)")
        return grades


class DataConfig(Section):
    """The feedback store and ingest. Layout under root: images/, and per split (train, holdout)
    feedback/ (event-hour partitions), groups/, quarantine/, state/."""

    root: str = Field("out/data", description="local path or pyarrow filesystem URI (s3://, gs://, hdfs://)")
    group_size: int = Field(4, ge=2, description="K, candidates per request")
    image_size: int | None = Field(32, ge=1, description="required side of square images; None accepts any size")
    label_policy: LabelPolicy = LabelPolicy()
    max_clock_skew_s: float = Field(300.0, ge=0, description="event times later than now + skew are quarantined")
    earliest_event_time: dt.datetime = Field(
        dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc),
        description="event times before this are quarantined as implausible (a zero or default timestamp)")
    batch_rows: int = Field(65536, ge=1, description="rows validated at a time within one partition file")
    late_window_hours: int = Field(1, ge=0, description="feedback up to this many event hours after its request's "
                                                        "impressions joins their group; later feedback is quarantined "
                                                        "as late (kept, counted in rows_late)")
    duplicate_window_hours: int = Field(720, ge=1, description="the ids an ingest run grouped are kept this many "
                                                               "hours after its commit, and a later run refuses "
                                                               "copies of them; then they are deleted")
    shuffle_blocks: int = Field(8, ge=1, description="not read: ingest groups within event-hour segments, without "
                                                     "a shuffle; accepted so that configs which set it still load")


# ---------------------------------------------------------------- models and training
class DistributedTraining(Section):
    """How a training run is spread over Ray Train workers, each with a DeepSpeed engine."""

    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one DeepSpeed rank each)")
    use_gpu: bool = Field(False, description="one GPU per worker, NCCL; false: CPU workers, gloo")
    bf16: bool = Field(False, description="bfloat16 mixed precision in DeepSpeed")
    seed: int = Field(0, description="seed of the run's initialisation and random draws")


class RMConfig(DistributedTraining):
    """PerFusionRM: architecture, and training under Ray Train + DeepSpeed."""

    clip: str | None = Field(None, description="local CLIPModel directory for the towers; None: the embedded CLIP")
    towers: Literal["frozen", "lora", "full"] = Field("frozen", description="how the CLIP towers are tuned")
    lora_rank: int = Field(8, ge=1, description="LoRA rank of the towers under towers=lora")
    plugin: bool = Field(True, description="merchant into the plug-ins; false: they see a zero vector (the "
                                           "non-personalized baseline, same capacity)")
    cross_layers: int = Field(2, ge=1, description="DCN-V2 cross layers per plug-in")
    merchant_dim: int = Field(64, ge=4, description="merchant encoder width")
    id_dropout: float = Field(0.5, ge=0, lt=1, description="share of known ids hidden in training (cold-start path)")
    loss: Literal["pl", "pairwise"] = Field("pl", description="Plackett-Luce group ranking or all-pairs logistic")
    plugin_input: Literal["projected", "pooled"] = Field(
        "pooled", description="what the plug-ins cross with the merchant: the tower's projected feature, or its "
                              "pooled output before CLIP's linear projection (the projection drops detail)")
    image_head_channels: int = Field(
        16, ge=0, description="channels of a small trainable convolutional image encoder read beside the image "
                              "tower, whose features the image plug-in crosses with the merchant (it learns what the "
                              "tower's vocabulary has no word for, e.g. a continuous hue or brightness); 0: none, the "
                              "frozen tower alone")
    image_head_dim: int = Field(32, ge=1, description="features the image head adds to the image plug-in's input")
    lr: float = Field(3e-3, gt=0, description="peak learning rate (AdamW)")
    lr_schedule: Literal["constant", "cosine"] = Field("cosine", description="after the warm-up: constant, or cosine "
                                                                            "decay to zero over rm.epochs")
    warmup_fraction: float = Field(0.05, ge=0, lt=1, description="share of the planned steps spent warming up")
    weight_decay: float = Field(0.5, ge=0, description="AdamW weight decay")
    batch_groups: int = Field(8, ge=1, description="groups per optimizer step on each worker")
    epochs: int = Field(8, ge=1, description="passes over the training groups at most (early stopping may end sooner)")
    patience: int = Field(4, ge=1, description="early stopping: epochs without a better validation GAUC "
                          "(the cosine schedule's best epochs come late; a shorter patience stops on early noise)")
    validation_fraction: float = Field(0.1, gt=0, lt=1, description="share of training groups held for early stopping")
    cache_shard_mb: int = Field(1024, ge=0, description="a worker keeps its training shard in memory after the first "
                                                        "epoch when it fits (MiB); 0: stream from Ray Data every epoch")
    out: str = Field("out/rm", description="run folder: Ray Train checkpoints and the exported model/")


class PolicyConfig(Section):
    """The diffusion policy: a frozen base model plus the personalized adaptive network."""

    base: str = Field("embedded", description="'embedded' or a local Stable Diffusion directory")
    lora_rank: int = Field(8, ge=1, description="LoRA rank on the branch's attention projections")
    merchant_dim: int = Field(64, ge=4, description="merchant encoder width")
    condition_channels: int = Field(8, ge=1, description="channels of the tiled merchant conditioning map")
    id_dropout: float = Field(0.25, ge=0, lt=1, description="share of known ids hidden in training (cold-start path)")
    num_inference_steps: int = Field(20, ge=1, description="DDIM steps when sampling")
    guidance_scale: float = Field(4.0, ge=0, description="classifier-free guidance; <= 1 switches it off")
    personalize_unconditional: bool = Field(
        False, description="branch on the unconditional half of guidance too (the merchant's shift then enters "
                           "once instead of scaled by guidance_scale)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights of the frozen base")


class AlignEvalConfig(Section):
    """`perfusion align eval`: base vs aligned images on held-out requests, same starting noise."""

    requests_per_merchant: int = Field(2, ge=1, description="held-out requests per merchant (seen and cold), when "
                                                            "requests_per_split is not set")
    requests_per_split: int | None = Field(
        None, ge=1, description="held-out requests for seen and for cold-start merchants each, taken round-robin over "
                                "the split's merchants (a win rate's 95% interval is about +-8 points at 120 requests "
                                "and a rate of 0.75); None: requests_per_merchant per merchant")
    images_per_request: int = Field(4, ge=1, description="K images per request and model")
    open_only: bool = Field(True, description="only requests where the environment says taste can show (FashionWorld: "
                                              "the prompt leaves colour, shade or pattern open)")
    seed: int = Field(1, description="seed of the starting noise shared by base and aligned")
    batch_size: int = Field(64, ge=1, description="images per sampling call")


class AlignConfig(DistributedTraining):
    """Group-level preference optimization of the adaptive network (`perfusion align train`)."""

    variant: Literal["pl", "multi_neg", "pairwise", "sft", "dgpo"] = Field(
        "dgpo", description="dgpo: DGPO-style group preference, the advantage-weighted better half against the "
                            "worse (the default: ahead of pl online at equal denoiser passes); pl: Plackett-Luce "
                            "over graded labels; multi_neg; pairwise: Diffusion-DPO on every pair of a group, "
                            "each pair its own noise; sft: denoising loss on positives")
    adapter: Literal["personalized", "plain_lora"] = Field(
        "personalized", description="the ControlNet-style merchant branch, or (ablation) a plain LoRA on the "
                                    "UNet with no merchant input")
    beta: float = Field(2500.0, gt=0, description="diffusers' Diffusion-DPO convention (no 1/2 factor)")
    lr: float = Field(1e-4, gt=0, description="learning rate (AdamW) of the adaptive network")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(20, ge=0, description="linear warm-up, then constant")
    batch_groups: int = Field(8, ge=1, description="groups per optimizer step on each worker")
    max_steps: int = Field(400, ge=1, description="optimizer steps in total (the data repeats in epochs)")
    share_noise: bool = Field(True, description="one timestep and noise per group, shared by its K candidates")
    min_timestep: float = Field(0.0, ge=0, lt=1, description="lowest share of the noise schedule sampled in "
                                                              "training (0: all timesteps)")
    checkpoint_every: int = Field(100, ge=1, description="optimizer steps between checkpoints")
    out: str = Field("out/align", description="run folder: Ray Train checkpoints and the exported pipeline/")
    eval: AlignEvalConfig = AlignEvalConfig()


class OnlineConfig(Section):
    """The coordinator's alignment rounds (`perfusion align`): each round consumes fresh feedback, generates
    groups with the current policy, scores them through the reward endpoint and optimizes the group
    objective (optimizer, objective and DeepSpeed settings come from the align section)."""

    rounds: int = Field(8, ge=1, description="rounds in total (a resumed run continues up to this many)")
    requests_per_round: int = Field(16, ge=1, description="on-policy requests per round over all workers (a "
                                                          "multiple of align.num_workers); K = data.group_size")
    steps_per_round: int = Field(25, ge=1, description="optimizer steps per round, align.batch_groups groups each")
    logged_fraction: float = Field(0.5, ge=0, le=1, description="share of each step's groups drawn from logged "
                                                                "feedback groups; the rest are this round's "
                                                                "on-policy groups")
    split: Literal["top_m", "margin", "ranking", "scores"] = Field(
        "scores", description="labels of a generated group from the RM's scores: top_m (the top_m best are P), margin "
                             "(every candidate within `margin` of the best is P; a group with no N is skipped), "
                             "ranking (graded: each candidate's rank, so pl ranks the whole group), scores (the "
                             "scores themselves, for objectives that weigh margins such as dgpo)")
    top_m: int = Field(1, ge=1, description="candidates in P under split=top_m (below data.group_size)")
    margin: float = Field(0.5, gt=0, description="RM score distance from the best under split=margin")
    partitions_per_round: int = Field(4, ge=0, description="fresh feedback partitions consumed per round, oldest "
                                                           "first (0: every one past the watermark)")
    rm_refresh_every: int = Field(2, ge=0, description="refresh the RM on the freshly consumed groups every N "
                                                       "rounds and roll the endpoint to it (0: never)")
    rm_refresh_epochs: int = Field(1, ge=1, description="passes over the fresh groups per RM refresh")
    rm_refresh_lr: float = Field(1e-3, gt=0, description="learning rate of the RM refresh (warm start)")
    publish_every: int = Field(0, ge=0, description="export the policy every N rounds and roll the design "
                                                    "endpoint to it when one is deployed (0: only at the end)")
    policy_average_decay: float = Field(
        0.7, ge=0, lt=1, description="the exported and published policy is an exponential moving average of the "
                                     "round-end weights with this decay (0: the last round's weights); the "
                                     "rounds keep generating with the current weights")
    live_hours: int = Field(0, ge=0, description="demo: the last N hours of world.hours are held back and "
                                                 "written into the store while the rounds run")
    live_interval_s: float = Field(20.0, gt=0, description="demo: seconds between two live feedback hours")
    num_inference_steps: int | None = Field(
        None, ge=1, description="sampler steps of the rounds' on-policy generation (None: policy.num_inference_steps); "
                                "fewer steps than at evaluation make more groups per second of round time")
    probe_requests: int = Field(16, ge=0, description="the probe set: this many fixed held-out requests (seen and "
                                                      "cold-start merchants) with fixed noise, generated by the "
                                                      "published policy after every round and scored by the oracle, "
                                                      "else the judge (0: no probe)")
    guard_rounds: int = Field(2, ge=0, description="over-optimization guard: when, for this many rounds in a row, "
                                                   "the probe's gold utility (oracle or judge) sits below its best "
                                                   "round's by more than online.guard_tolerance while its RM reward "
                                                   "sits above that round's, stop and ship the best probe policy "
                                                   "(0: off)")
    guard_tolerance: float = Field(0.05, ge=0, description="how far below its best the probe's gold utility must fall "
                                                           "to count for the guard (on the demo's 16 probe requests a "
                                                           "healthy run moves up to 0.03 below its best; a gaming "
                                                           "policy falls 0.07-0.12)")
    ship: Literal["best_probe", "last"] = Field(
        "best_probe", description="the exported policy: the averaged policy of the round with the best probe "
                                  "utility (what was reached ships), or the last round's average")
    request_source: Literal["auto", "world", "logged"] = Field(
        "auto", description="where on-policy requests come from: logged (the train split's recent logged requests, "
                            "in proportion to their traffic), world (the world's own request sampler), auto (world "
                            "when the config has one, else logged)")
    request_window_hours: float = Field(24.0, gt=0, description="logged requests within this many hours of the "
                                                                "newest one are the pool on-policy requests are "
                                                                "drawn from")
    seed: int = Field(0, description="request sampling and the workers' noise")
    tensorboard: bool = Field(True, description="per-round metrics as TensorBoard event files in <out>/tensorboard")
    out: str = Field("out/online", description="run folder: Ray Train checkpoints, RM versions, the exported "
                                               "pipeline/, tensorboard/, rounds.jsonl")


def _gpu_share(value: float) -> float:
    """Ray's rule for an actor's GPUs: a share of one GPU below 1, whole GPUs above."""
    if value > 1 and value != int(value):
        raise ValueError(f"{value:g} GPUs: a replica takes a share of one GPU (<= 1) or whole GPUs")
    return value


ReplicaDtype = Literal["float32", "bfloat16", "float16"]


class ServeConfig(Section):
    """The reward endpoint on Ray Serve (perfusion_ray/serve/): where it binds, what it accepts, how it
    batches and scales. One HTTP proxy per cluster, so host/port/token are shared by every app on it."""

    host: str = Field("127.0.0.1", description="HTTP bind address; anything but loopback needs a bearer token")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of Serve's proxy (every app on the cluster)")
    bearer_token: str | None = Field(None, description="required for /v1/* when set; prefer bearer_token_env "
                                                       "over writing a secret into a config file")
    bearer_token_env: str = Field("PERFUSION_SERVE_TOKEN", description="environment variable read for the token "
                                                                       "when bearer_token is unset")
    app_name: str = Field("reward", min_length=1, description="Serve application name (handles look it up)")
    route_prefix: str = Field("/", pattern=r"^/", description="HTTP path prefix of the application")
    model_dir: str | None = Field(None, description="RM directory served first; None: <rm.out>/model")
    # What one request may carry.
    max_images_per_request: int = Field(64, ge=1, description="more images in one request answer 422")
    max_body_bytes: int = Field(4 * 2**20, ge=1024, description="larger request bodies answer 413")
    max_image_side: int = Field(1024, ge=1, description="decoded images wider or taller are refused (decompression "
                                                         "bombs), whatever image_policy says")
    image_policy: Literal["convert", "refuse"] = Field(
        "convert", description="an image of another size or mode than the RM's (RGB, rm image size): convert "
                               "(to RGB, resized) or refuse with 422")
    # Batching: @serve.batch counts images, not requests, so a batch is at most max_batch_size images.
    max_batch_size: int = Field(64, ge=1, description="images per batched forward pass in a replica")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="how long a batch waits to fill after its first request")
    # Replicas and autoscaling (Serve's autoscaling_config).
    replica_cpus: float = Field(0.5, gt=0, description="logical CPUs per replica (fractional on small machines)")
    replica_gpus: float = Field(0.0, ge=0, description="GPUs per replica (0.25: four replicas share a GPU); the "
                                                       "replica runs on CUDA when Ray assigns it a GPU that torch "
                                                       "sees, else on the CPU, and logs which")
    replica_dtype: ReplicaDtype = Field("float32", description="the served RM's weights and compute; bfloat16 or "
                                                               "float16 halve its memory (bfloat16 becomes float16 "
                                                               "on GPUs without it)")
    _whole_gpus = field_validator("replica_gpus")(_gpu_share)
    access_log: bool = Field(False, description="a log line per request from each replica (costs CPU per request)")
    max_ongoing_requests: int = Field(64, ge=1, description="requests in flight per replica (queued for a batch "
                                                           "or scoring); Serve's default of 5 starves batching")
    min_replicas: int = Field(1, ge=0, description="autoscaling lower bound")
    max_replicas: int = Field(2, ge=1, description="autoscaling upper bound")
    target_ongoing_requests: float = Field(8.0, gt=0, description="autoscaling aims at this many in flight per replica")
    upscale_delay_s: float = Field(2.0, ge=0, description="sustained load this long before adding a replica")
    downscale_delay_s: float = Field(15.0, ge=0, description="sustained low load this long before removing one")
    look_back_period_s: float = Field(12.0, gt=0, description="window the autoscaler averages ongoing requests over; "
                                                             "Serve wants it above its 10 s metrics push interval")
    # Health checks (both apps): how soon a dead or hung replica leaves the status and gets replaced.
    health_check_period_s: float = Field(1.0, gt=0, description="Serve checks each replica this often; a dead one "
                                                                "shows as unhealthy within about this long")
    health_check_timeout_s: float = Field(10.0, gt=0, description="a replica whose check takes longer is "
                                                                  "replaced (a hung one; fractional CPUs answer slowly)")

    @model_validator(mode="after")
    def _consistent(self) -> "ServeConfig":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        if self.max_images_per_request > self.max_batch_size:
            raise ValueError(f"max_images_per_request ({self.max_images_per_request}) exceeds max_batch_size "
                             f"({self.max_batch_size}): one request must fit one batch")
        return self


class DesignConfig(Section):
    """The design endpoint (perfusion_ray/serve/design_*.py): PerFusionPipeline on Ray Serve. POST /v1/designs
    returns K personalized candidates (logged as impressions), POST /v1/feedback appends select / click /
    order / return events to the feedback store, GET / is the merchant page. HTTP host, port and bearer token
    are config.serve's: one proxy per cluster serves every app."""

    app_name: str = Field("design", min_length=1, description="Serve application name (handles look it up)")
    route_prefix: str = Field("/design", pattern=r"^/", description="HTTP path prefix: page at <prefix>/, API at "
                                                                    "<prefix>/v1/... (the reward app owns /)")
    pipeline_dir: str | None = Field(None, description="PerFusionPipeline directory served first; None: "
                                                       "<align.out>/pipeline")
    store_root: str | None = Field(None, description="feedback store the endpoint writes (local path or pyarrow "
                                                     "URI); None: data.root")
    split: Literal["train", "holdout"] = Field("train", description="store split impressions and feedback go to")
    max_k: int = Field(8, ge=1, description="candidates returned per request at most; k defaults to "
                                            "data.group_size")
    any_k: bool = Field(False, description="accept a k other than data.group_size (ingest quarantines such groups "
                                           "as the wrong size: only for callers that do not train on them)")
    best_of_n: int = Field(0, ge=0, description="0: off; else generate n (>= k) images per request and return the "
                                                "k the reward app ranks highest (a request may ask its own n)")
    max_n: int = Field(16, ge=1, description="images generated for one request at most, best-of-n included")
    reward_app: str | None = Field(None, description="Serve app that ranks best-of-n candidates; None: "
                                                     "serve.app_name")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="larger request bodies answer 413")
    max_events_per_feedback: int = Field(64, ge=1, description="events in one POST /v1/feedback at most")
    rate_limit_per_minute: float = Field(120.0, ge=0, description="design requests per merchant per minute in one "
                                                                  "replica (0: unlimited); beyond: 429 + Retry-After")
    rate_limit_burst: int = Field(10, ge=1, description="requests a merchant may send at once before the rate bites")
    batch_across_merchants: bool = Field(True, description="one pipeline call per batch whatever its merchants; "
                                                           "false: one call per merchant (the benchmark's baseline)")
    max_batch_size: int = Field(32, ge=1, description="images per batched pipeline call (@serve.batch counts "
                                                      "images); a request's n images always share one call")
    batch_wait_timeout_s: float = Field(0.02, ge=0, description="how long a batch waits to fill after its first "
                                                                "request")
    # Replicas: autoscaling bounds and target here, delays and look-back from serve.
    min_replicas: int = Field(1, ge=0, description="autoscaling lower bound")
    max_replicas: int = Field(1, ge=1, description="autoscaling upper bound (a replica holds a whole pipeline)")
    target_ongoing_requests: float = Field(8.0, gt=0, description="autoscaling aims at this many in flight per "
                                                                  "replica")
    max_ongoing_requests: int = Field(32, ge=1, description="requests in flight per replica (queued for a batch)")
    replica_cpus: float = Field(0.5, gt=0, description="logical CPUs per design replica")
    replica_gpus: float = Field(0.0, ge=0, description="GPUs per design replica (each holds a whole pipeline); "
                                                       "CUDA when Ray assigns a GPU that torch sees, else the CPU")
    replica_dtype: ReplicaDtype = Field("float32", description="the served pipeline's weights and compute (a VAE "
                                                               "that asks for float32 under float16, as SDXL's does, "
                                                               "keeps it)")
    _whole_gpus = field_validator("replica_gpus")(_gpu_share)

    @model_validator(mode="after")
    def _limits_agree(self) -> "DesignConfig":
        problems = [f"{low} ({getattr(self, low)}) above {high} ({getattr(self, high)})"
                    for low, high in (("min_replicas", "max_replicas"), ("max_k", "max_n"), ("max_n", "max_batch_size"))
                    if getattr(self, low) > getattr(self, high)]
        if problems:
            raise ValueError("; ".join(problems))
        return self


class ClusterConfig(Section):
    """Where Ray runs. address None: RAY_ADDRESS if set, else a local cluster on 127.0.0.1."""

    address: str | None = Field(None, description="a running cluster to join (ray://... or host:port); None: "
                                                  "RAY_ADDRESS, else a local cluster on 127.0.0.1")
    num_cpus: int | None = Field(None, ge=1, description="logical CPUs of a local cluster (None: all)")
    cpus_per_worker: float = Field(0.5, gt=0, description="per Ray Train worker; 1.0 on 2 cores hangs Data+Train")
    serve_ingress: Literal["proxy", "haproxy"] = Field(
        "proxy", description="how HTTP reaches Serve on this cluster: Serve's Python proxy on serve.host:port, or "
                             "HAProxy there in front of replicas that take HTTP themselves (Serve's high-throughput "
                             "mode: RAY_SERVE_ENABLE_HA_PROXY + RAY_SERVE_THROUGHPUT_OPTIMIZED). haproxy makes the "
                             "replicas listen on every interface, so it needs a bearer token. Applied when a local "
                             "cluster starts; a cluster you join must have been started with the same environment")


class PerfusionConfig(Section):
    world: WorldConfig | None = Field(None, description="FashionWorld, the embedded simulator; absent: the store "
                                                        "alone (every command but `world simulate` runs)")
    data: DataConfig = DataConfig()
    rm: RMConfig = RMConfig()
    policy: PolicyConfig = PolicyConfig()
    align: AlignConfig = AlignConfig()
    online: OnlineConfig = OnlineConfig()
    serve: ServeConfig = ServeConfig()
    design: DesignConfig = DesignConfig()
    cluster: ClusterConfig = ClusterConfig()
    source: str | None = Field(None, description="the file this config was loaded from (set by load_config)")

    @model_validator(mode="after")
    def _online_fits(self) -> "PerfusionConfig":
        online = self.online
        if online.requests_per_round % self.align.num_workers:
            raise ValueError(f"online.requests_per_round ({online.requests_per_round}) must be a multiple of "
                             f"align.num_workers ({self.align.num_workers}): every worker generates the same share")
        if online.split == "top_m" and online.top_m >= self.data.group_size:
            raise ValueError(f"online.top_m ({online.top_m}) must be below data.group_size ({self.data.group_size})"
                             ": a group needs negatives")
        if self.world is not None and online.live_hours >= self.world.hours:
            raise ValueError(f"online.live_hours ({online.live_hours}) must be below world.hours ({self.world.hours})")
        return self

    def with_absolute_paths(self) -> "PerfusionConfig":
        """A copy whose local output paths (data.root, rm.out, align.out, online.out, design.store_root) and
        world.taste_family are absolute, for Ray workers and actors, which run in another working directory
        than the driver. URIs (s3://...) stay as they are."""
        from perfusion_ray.storage import absolute

        copy = self.model_copy(deep=True)
        if copy.world is not None:
            copy.world.taste_family = self.resolve_input(self.world.taste_family)
        for name, value in self.output_paths().items():
            section, field = name.split(".")
            setattr(getattr(copy, section), field, absolute(value))
        return copy

    def output_paths(self) -> dict[str, str]:
        """The folders this config writes to, by field name (design.store_root only when set)."""
        paths = {"data.root": self.data.root, "rm.out": self.rm.out, "align.out": self.align.out,
                 "online.out": self.online.out}
        if self.design.store_root:
            paths["design.store_root"] = self.design.store_root
        return paths

    def resolve_input(self, path: Path) -> Path:
        """An input path named in the config, resolved against the config file's folder."""
        if path.is_absolute() or self.source is None:
            return path
        return (Path(self.source).parent / path).resolve()


def lost_outputs(outputs: dict[str, object], job_runtime_env: dict | None) -> list[str]:
    """The relative output paths that a `ray job submit` with a working_dir would lose: such a job runs inside
    its unpacked working_dir package, which Ray deletes with the session, so anything written below it goes
    with it. Empty outside a submitted job, without a working_dir, or when every path is absolute or a URI."""
    if not (job_runtime_env or {}).get("working_dir"):
        return []
    return [name for name, value in outputs.items()
            if value is not None and "://" not in str(value) and not Path(str(value)).expanduser().is_absolute()]


def refuse_lost_outputs(outputs: dict[str, object], config: PerfusionConfig) -> PerfusionConfig:
    """The config, unless it runs as a submitted job that would write one of `outputs` (the paths a command
    writes, by field or flag name) as a relative folder into its working_dir package (lost with the
    session): then one line naming the paths."""
    from perfusion_ray.runtime import job_runtime_env

    lost = lost_outputs(outputs, job_runtime_env())
    if lost:
        named = ", ".join(f"{name}={outputs[name]}" for name in lost)
        raise PerfusionError(f"relative output path(s) under `ray job submit --working-dir`: {named} would be written "
                             f"inside the job's unpacked package and lost when the job ends",
                             hint="give an absolute path on storage every node keeps (a shared file system) or a "
                                  "URI such as s3://bucket/prefix, e.g. --set rm.out=s3://bucket/runs/rm")
    return config


def save_config(config: PerfusionConfig, path: str | Path) -> Path:
    """Write the whole config as YAML that load_config reads back to an equal config (for a Serve
    application builder, which rebuilds its config from a file rather than from Python objects)."""
    from perfusion_ray.storage import atomic_write_bytes

    raw = config.model_dump(mode="json", exclude={"source"})
    atomic_write_bytes(path, yaml.safe_dump(raw, sort_keys=False).encode())
    return Path(path)


# ---------------------------------------------------------------- loading
def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise PerfusionError(f"--set {item!r}: expected section.field=value", hint="e.g. --set rm.lr=1e-4")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def _section_type(annotation) -> type[BaseModel] | None:
    """The config section a field holds (optional sections included), or None for a plain value."""
    import typing

    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _apply_override(raw: dict, path: list[str], value: Any, item: str) -> None:
    model: type[BaseModel] | None = PerfusionConfig
    node = raw
    for depth, key in enumerate(path):
        fields = model.model_fields if model is not None else {}
        if model is not None and key not in fields:
            where = ".".join(path[:depth]) or "the top level"
            known = ", ".join(sorted(fields))
            raise PerfusionError(f"--set {item}: unknown field {key!r} in {where}", hint=f"known fields: {known}")
        if depth == len(path) - 1:
            node[key] = value
            return
        model = _section_type(fields[key].annotation) if model is not None else None
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child


def _describe(error: dict) -> str:
    field = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = "unknown field"
    value = error.get("input")
    shown = "" if isinstance(value, dict) or error["type"] == "missing" else f" (got {value!r})"
    return f"{field}: {message}{shown}"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PerfusionConfig:
    """Load a YAML config (default: configs/fashionworld.yaml) and apply `section.field=value` overrides.

    Raises PerfusionError naming the file (or --set) and the field for unknown keys, wrong types and
    bad values.
    """
    path = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PerfusionError(f"config file {path} does not exist", hint=f"the default is {DEFAULT_CONFIG}") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise PerfusionError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise PerfusionError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    overridden: set[str] = set()
    for item in overrides or []:
        keys, value = _parse_override(item)
        _apply_override(raw, keys, value, item)
        overridden.add(".".join(keys))
    raw["source"] = str(path.resolve())
    try:
        return PerfusionConfig.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            origin = "--set" if any(field == key or field.startswith(key + ".") for key in overridden) else str(path)
            problems.append(f"{origin}: {_describe(error)}")
        raise PerfusionError("invalid config:\n  " + "\n  ".join(problems)) from None
