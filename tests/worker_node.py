"""A Ray worker node (logical GPUs if asked for) joined to a running cluster on 127.0.0.1, until SIGTERM:
    python -m tests.worker_node <gcs address> <num_cpus> <num_gpus>

What Ray's own multi-node test tooling (ray.cluster_utils.Cluster.add_node) does, for a head this process did
not start. `ray start --address=127.0.0.1:<port>` cannot do it: the CLI rewrites a loopback address to the
machine's external one (its multi-node mode) and then waits for a GCS that listens on loopback only.
"""

from __future__ import annotations

import signal
import sys


def main(address: str, num_cpus: float, num_gpus: float) -> None:
    import ray._private.node
    import ray._private.parameter

    from tests.conftest import free_port

    params = ray._private.parameter.RayParams(
        gcs_address=address, node_ip_address="127.0.0.1", num_cpus=num_cpus, num_gpus=num_gpus,
        object_store_memory=200 * 2**20, min_worker_port=0, max_worker_port=0, node_manager_port=0,
        include_log_monitor=False,
        # Ports with fixed defaults the head (or another cluster on this machine) already holds.
        dashboard_agent_listen_port=free_port(), metrics_agent_port=free_port(), metrics_export_port=free_port(),
        runtime_env_agent_port=free_port())
    # shutdown_at_exit: SIGTERM drains the node, stops every process it started, and exits.
    node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    print(f"node {node.unique_id} joined {address}", flush=True)
    while True:
        signal.pause()


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]))
