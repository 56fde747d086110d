"""`ray job submit` entrypoint: deploy the reward endpoint on the cluster the job runs in and return
(`perfusion serve --detach`; the job sets RAY_ADDRESS). Run again with a new `--model DIR` to roll a new
RM version out in place (only the deployment's user_config changes; no request fails).

    ray job submit --working-dir . -- python jobs/serve_rm.py --config configs/fashionworld.yaml

Extra arguments go to `perfusion serve` unchanged (`--set ...`, `--model DIR`). The endpoint stays up
after the job ends; `serve delete reward` (or `serve shutdown`) against the cluster removes it.
"""

import sys

from perfusion_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", "--detach", *sys.argv[1:]]))
