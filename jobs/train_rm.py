"""`ray job submit` entrypoint: train PerFusionRM on the cluster (`perfusion rm train`).

    ray job submit --working-dir . -- python jobs/train_rm.py --config configs/fashionworld.yaml

Extra arguments go to `perfusion rm train` unchanged (`--set ...`, `--with-baseline`, `--resume`).
"""

import sys

from perfusion_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["rm", "train", *sys.argv[1:]]))
