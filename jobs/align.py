"""`ray job submit` entrypoint: the online alignment rounds on the cluster (`perfusion align`: the
coordinator serves the RM, keeps Ray Train + DeepSpeed workers alive across rounds, consumes fresh feedback
past the watermark, generates and scores on-policy groups, optimizes the group objective, checkpoints
every round, and exports <online.out>/pipeline).

    ray job submit --working-dir . -- python jobs/align.py --config configs/fashionworld.yaml

Extra arguments go to `perfusion align` unchanged (`--set ...`, `--resume` after a crash). Offline
alignment on logged groups alone is `perfusion align train --offline`.
"""

import sys

from perfusion_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["align", *sys.argv[1:]]))
