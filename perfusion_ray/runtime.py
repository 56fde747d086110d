"""Environment hygiene and Ray start-up, in one place.

`configure_environment()` must run before `import ray` anywhere in the process (the CLI, jobs and
tests call it first): Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER at import time to decide whether
it binds the machine's external address or loopback.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from perfusion_ray.config import ClusterConfig

LOOPBACK = "127.0.0.1"

# Variables every process of ours needs, driver and Ray workers alike.
_PROCESS_ENV = {
    "HF_HUB_OFFLINE": "1",  # a stray hub call fails fast instead of hanging on a closed network
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


# Serve's high-throughput ingress (cluster.serve_ingress: haproxy). Every Serve process reads these when it
# starts, so they go into the environment of a local cluster before it starts. The throughput mode would
# also move handle routing onto the caller's event loop, which breaks synchronous handle callers (the
# rounds' Train workers): the router keeps its own loop.
HAPROXY_INGRESS_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
                       "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1"}


# Serve's HTTP proxy runs serve/proxy_middleware.py: a request whose replica died under it answers 503 +
# Retry-After instead of a bare 500, and /-/routes asks for the bearer token when the proxy has one.
PROXY_MIDDLEWARE_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "perfusion_ray.serve.proxy_middleware:middlewares"}


def serve_ingress_env(ingress: str) -> dict[str, str]:
    return {**PROXY_MIDDLEWARE_ENV, **(HAPROXY_INGRESS_ENV if ingress == "haproxy" else {})}


def _has_cuda() -> bool:
    # Cheap on purpose (runs at package import, in the driver and in every Ray worker): this node's NVIDIA
    # device node, not a torch import.
    return os.path.exists("/dev/nvidiactl")


def deepspeed_accelerator_env(node_has_gpu: bool) -> dict[str, str]:
    """DS_ACCELERATOR for a process on a node with or without an NVIDIA GPU: cpu where there is none (DeepSpeed
    would otherwise probe every accelerator package first), nothing where there is one (DeepSpeed then picks CUDA
    when the process sees a device, the CPU when Ray gave it none)."""
    return {} if node_has_gpu else {"DS_ACCELERATOR": "cpu"}


def worker_env_vars() -> dict[str, str]:
    """Environment for Ray workers (runtime_env env_vars): the driver's hygiene, nothing about its hardware.

    DS_ACCELERATOR is not among them: the driver (a GPU-less head under `ray job submit` or a RayJob) would
    tell GPU workers to use the CPU. Each worker decides for itself when it imports perfusion_ray
    (configure_environment), on its own node and before any DeepSpeed import."""
    return dict(_PROCESS_ENV)


def is_loopback_address(address: str) -> bool:
    """Whether a Ray address (host:port, ray://host:port, http://host:port, [::1]:port) names this machine's
    loopback interface."""
    import ipaddress
    from urllib.parse import urlsplit

    host = urlsplit(address if "://" in address else f"//{address}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def configure_environment(address: str | None = None) -> None:
    """Set process-wide variables. Keeps Ray on loopback for a local cluster and for joining one by a
    loopback address; only an address elsewhere lets Ray pick the machine's external interface."""
    for key, value in {**_PROCESS_ENV, **deepspeed_accelerator_env(_has_cuda())}.items():
        os.environ.setdefault(key, value)
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or address == "local" or is_loopback_address(address):
        # Without this Ray 2.60 binds the external interface (docs/stack-notes.md), and joining by a loopback
        # address dials the external one instead: Ray rewrites 127.0.0.1 to the machine's routable address
        # before connecting (services.resolve_ip_for_localhost), where a cluster bound to loopback does not
        # listen, and the client retries until it times out.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def disable_deepspeed_shm_op() -> None:
    """Stop DeepSpeed from compiling its shared-memory comm op with g++ (about a minute, 3.5 GiB) on CPU.

    `import deepspeed.comm.torch as m` binds the real `torch` package, so the module is fetched by name.
    """
    module = importlib.import_module("deepspeed.comm.torch")
    module.build_shm_op = lambda: None


def job_runtime_env() -> dict:
    """The runtime_env of the `ray job submit` running us ({} outside a submitted job)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return {}
    return runtime_env if isinstance(runtime_env, dict) else {}


def _job_env_keys() -> set[str]:
    """Environment variables the runtime_env of the `ray job submit` running us already sets."""
    return set(job_runtime_env().get("env_vars") or {})


def init_ray(cluster: "ClusterConfig | None" = None):
    """Join RAY_ADDRESS / cluster.address, or start a local cluster bound to 127.0.0.1.

    Returns the ray module. Idempotent: an already-initialised Ray is reused.
    """
    address = (cluster.address if cluster else None) or os.environ.get("RAY_ADDRESS")
    configure_environment(address)
    import ray

    if ray.is_initialized():
        return ray
    from perfusion_ray.console import forwards_worker_output

    forward = forwards_worker_output()  # a quiet console leaves the workers' output in Ray's session logs
    taken = _job_env_keys()  # a submitted job's own env_vars win; Ray refuses the same key twice
    runtime_env = {"env_vars": {key: value for key, value in worker_env_vars().items() if key not in taken}}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=forward)
    else:
        # Inherited by the raylet and so by every worker, Serve's controller, proxies and replicas included.
        os.environ.update(serve_ingress_env(cluster.serve_ingress if cluster else "proxy"))
        ray.init(
            num_cpus=cluster.num_cpus if cluster else None,
            _node_ip_address=LOOPBACK,
            runtime_env=runtime_env,
            include_dashboard=True,  # without it a cleaner actor logs a warning every second
            log_to_driver=forward,
        )
    if not forward:  # printed into the command's log file
        print(f"Ray workers' output: {ray._private.worker.global_worker.node.get_logs_dir_path()}", flush=True)
    return ray


def machine() -> str:
    """One line naming the machine a measurement ran on (benchmarks and reports print it)."""
    import platform

    import psutil

    cpu = platform.processor() or "unknown cpu"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = psutil.virtual_memory().total / 2**30
    return f"{platform.node()} | {cpu} | {os.cpu_count()} logical CPUs | {memory:.0f} GiB | Python {platform.python_version()}"
