"""`ray job submit` entrypoint: ingest new feedback partitions of both splits on the cluster.

    ray job submit --working-dir . -- python jobs/ingest.py --config configs/fashionworld.yaml
"""

import sys

from perfusion_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "ingest", *sys.argv[1:]]))
