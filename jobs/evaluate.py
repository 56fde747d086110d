"""`ray job submit` entrypoint: evaluate on held-out data, `perfusion rm eval` then `perfusion align eval`.

    ray job submit --working-dir . -- python jobs/evaluate.py --config configs/fashionworld.yaml

The same arguments (`--config`, `--set ...`) go to both commands; the job fails with the first command
that fails.
"""

import sys

from perfusion_ray.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(["rm", "eval", *args]) or main(["align", "eval", *args]))
