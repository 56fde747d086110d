"""`ray job submit` entrypoint: align the personalized generator on the cluster
(`perfusion align train --offline`: the group objective on the logged group examples of the train split,
Ray Train + DeepSpeed ZeRO, exported to <align.out>/pipeline).

    ray job submit --working-dir . -- python jobs/align.py --config configs/fashionworld.yaml

The online coordinator rounds (generate, score through the reward endpoint, optimize, on fresh feedback)
do not exist yet; when they do, this entrypoint switches to them. Extra arguments go to
`perfusion align train` unchanged (`--set ...`, `--resume`).
"""

import sys

from perfusion_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["align", "train", "--offline", *sys.argv[1:]]))
