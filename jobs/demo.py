"""`ray job submit` entrypoint: the main job (`perfusion demo`) on the cluster.

    ray job submit --working-dir . -- python jobs/demo.py --config configs/fashionworld.yaml
"""

import sys

from perfusion_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
