"""Loads PerFusion exports with diffusers, peft and transformers alone (run by tests/test_interop.py).

Run as `python -I -S plain_interop.py <site-packages> <case.json>`: no site processing, so the editable
install of perfusion_ray is not on the path; only the given site-packages folder is. Writes what it
generated and measured to <out>/plain.npz and <out>/plain.json; the parent compares them with its own.
"""

import json
import sys

sys.path.append(sys.argv[1])
case = json.loads(open(sys.argv[2]).read())

import numpy as np  # noqa: E402
import torch  # noqa: E402

report: dict = {}
try:
    import perfusion_ray  # noqa: F401
    report["perfusion_ray_importable"] = True
except ImportError:
    report["perfusion_ray_importable"] = False

from diffusers import ControlNetModel, DiffusionPipeline  # noqa: E402
from peft import PeftConfig, PeftModel  # noqa: E402
from transformers import AutoModel  # noqa: E402

torch.set_num_threads(1)
arrays = {}

# 1. Each pipeline, as a community pipeline.
for kind, export in case["pipelines"].items():
    pipe = DiffusionPipeline.from_pretrained(export, custom_pipeline=export, trust_remote_code=True)
    report[f"{kind}_pipeline_class"] = f"{type(pipe).__module__}.{type(pipe).__name__}"
    report[f"{kind}_component_modules"] = {name: type(getattr(pipe, name)).__module__
                                           for name in ("adapter", "vae", "unet")}
    for name, merchant in case["merchants"].items():
        arrays[f"{kind}_{name}"] = pipe(case["prompts"], merchant=merchant, num_images_per_prompt=2,
                                        num_inference_steps=case["steps"], output_type="np",
                                        generator=torch.Generator().manual_seed(case["seed"])).images

# 2. The embedded pipeline's branch through standard classes.
export = case["pipelines"]["embedded"]
pipe = DiffusionPipeline.from_pretrained(export, custom_pipeline=export, trust_remote_code=True)
controlnet, info = ControlNetModel.from_pretrained(export, subfolder="adapter/controlnet", output_loading_info=True)
report["controlnet_loading"] = {kind: len(names) for kind, names in info.items()}
try:
    ControlNetModel.from_pretrained(export, subfolder="adapter")
    report["adapter_folder_as_controlnet"] = "loaded"
except (OSError, ValueError) as exc:
    report["adapter_folder_as_controlnet"] = f"{type(exc).__name__}: {exc}"
lora = PeftConfig.from_pretrained(f"{export}/adapter/lora")
report["lora"] = {"peft_type": str(lora.peft_type.value), "r": lora.r, "targets": sorted(lora.target_modules)}
branch = PeftModel.from_pretrained(controlnet, f"{export}/adapter/lora").eval()
generator = torch.Generator().manual_seed(1)
sample = torch.randn((2, 4, 8, 8), generator=generator)
context = torch.randn((2, 16, controlnet.config.cross_attention_dim), generator=generator)
condition = torch.randn((2, controlnet.config.conditioning_channels, 8, 8), generator=generator)
with torch.no_grad():
    standard = branch(sample, 500, context, controlnet_cond=condition, return_dict=False)
    carried = pipe.adapter.controlnet(sample, 500, context, controlnet_cond=condition, return_dict=False)
report["peft_branch_max_difference"] = max(float((a - b).abs().max()) for a, b in zip(
    [*standard[0], standard[1]], [*carried[0], carried[1]]))

# 3. The reward model through transformers.
model = AutoModel.from_pretrained(case["reward_model"], trust_remote_code=True)
report["reward_model_class"] = f"{type(model).__module__}.{type(model).__name__}"
rows = case["reward_rows"]
arrays["scores"] = model.score(rows["merchants"], rows["prompts"], np.load(case["reward_images"]))
try:
    AutoModel.from_pretrained(case["broken_reward_model"], trust_remote_code=True)
    report["broken_reward_model"] = "loaded"
except ValueError as exc:
    report["broken_reward_model"] = str(exc)

np.savez(f"{case['out']}/plain.npz", **arrays)
with open(f"{case['out']}/plain.json", "w") as handle:
    json.dump(report, handle, indent=2)
