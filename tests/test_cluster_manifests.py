"""cluster/: every manifest loads, and everything it names exists: entrypoint scripts, python import paths
(imported, attribute looked up), config files (loaded and validated, `--set` overrides included), the
paths configs/sd15.yaml uses (mounted on every node), resource names; and the GPU workers it offers cover
the configs' num_workers with use_gpu. No cluster, no network: seconds."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import yaml

from perfusion_ray.config import load_config
from perfusion_ray.serve import reward_app

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER = CLUSTER / "aws_gpu.yaml"
KUBERAY = {name: CLUSTER / f"{name}.yaml" for name in ("raycluster", "rayjob_align", "rayservice_reward")}
MANIFESTS = [LAUNCHER, *KUBERAY.values(), CLUSTER / "serve_reward.yaml", CLUSTER / "serve_design.yaml"]
GPU_CONFIG = REPO / "configs" / "sd15.yaml"
RAY_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}  # the package asks for no custom resource
K8S_RESOURCES = {"cpu", "memory", "nvidia.com/gpu", "ephemeral-storage"}


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _strings(node):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)
    elif isinstance(node, str):
        yield node
        if "\n" in node and ":" in node:  # embedded YAML (serveConfigV2, runtimeEnvYAML)
            yield from _strings(yaml.safe_load(node))


def _cluster_spec(name: str) -> dict:
    doc = _load(KUBERAY[name])
    return {"RayCluster": lambda d: d["spec"], "RayJob": lambda d: d["spec"]["rayClusterSpec"],
            "RayService": lambda d: d["spec"]["rayClusterConfig"]}[doc["kind"]](doc)


def _ray_version() -> str:
    import ray

    return ray.__version__


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_everything_a_manifest_names_exists(path):
    text = "\n".join([path.read_text(), *_strings(_load(path))])  # comments name commands too
    scripts = set(re.findall(r"python\s+(\S+\.py)", text))
    for script in scripts:
        assert (REPO / script).is_file(), f"{path.name}: {script} missing"
    for module, attribute in set(re.findall(r"\b([a-z_]\w*(?:\.\w+)+):([A-Za-z_]\w*)\b", text)):
        if module.startswith("perfusion_ray"):
            assert callable(getattr(importlib.import_module(module), attribute)), f"{path.name}: {module}:{attribute}"
    configs = set(re.findall(r"configs/[\w./-]+\.yaml", text))
    for config in configs:
        load_config(REPO / config)  # exists and validates
    assert configs, f"{path.name} names no config"
    for image_tag in re.findall(r"rayproject/ray:([\w.-]+)", text):
        assert image_tag.startswith(_ray_version() + "-"), f"{path.name}: image {image_tag} vs ray {_ray_version()}"


def test_jobs_use_the_gpu_config():
    job = _load(KUBERAY["rayjob_align"])
    assert job["spec"]["entrypoint"] == "python jobs/align.py --config configs/sd15.yaml"
    assert "configs/sd15.yaml" in LAUNCHER.read_text()


def _serve_apps() -> dict[str, dict]:
    service = _load(KUBERAY["rayservice_reward"])
    return {"rayservice": yaml.safe_load(service["spec"]["serveConfigV2"]),
            "serve_reward": _load(CLUSTER / "serve_reward.yaml")}


@pytest.mark.parametrize("which", ["rayservice", "serve_reward"])
def test_serve_configs_are_valid_and_match_the_package(which):
    from ray.serve.schema import ServeDeploySchema

    config = _serve_apps()[which]
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == reward_app.IMPORT_PATH
    assert [d["name"] for d in app["deployments"]] == [reward_app.DEPLOYMENT_NAME]
    assert set(app["args"]) <= {"config", "set", "model_dir"}  # what build_app accepts
    loaded = load_config(REPO / app["args"]["config"], app["args"].get("set") or [])  # overrides validate
    assert app["name"] == loaded.serve.app_name and app["route_prefix"] == loaded.serve.route_prefix
    assert config["http_options"]["host"] == loaded.serve.host and config["http_options"]["port"] == loaded.serve.port
    if which == "rayservice":  # the GPU config's exported RM, on the shared volume
        assert app["deployments"][0]["user_config"]["model_dir"] == str(Path(loaded.rm.out) / "model")
        assert loaded.rm.out.startswith("/mnt/shared/")


def test_serve_design_is_valid_and_matches_the_package():
    from ray.serve.schema import ServeDeploySchema

    from perfusion_ray.serve import design_app

    config = _load(CLUSTER / "serve_design.yaml")
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == design_app.IMPORT_PATH
    assert [d["name"] for d in app["deployments"]] == [design_app.DEPLOYMENT_NAME]
    assert set(app["args"]) <= {"config", "set", "pipeline_dir"}  # what build_app accepts
    assert set(app["deployments"][0]["user_config"]) == {"pipeline_dir"}
    loaded = load_config(REPO / app["args"]["config"], app["args"].get("set") or [])
    assert app["name"] == loaded.design.app_name and app["route_prefix"] == loaded.design.route_prefix
    assert config["http_options"] == _load(CLUSTER / "serve_reward.yaml")["http_options"]  # one proxy for both
    assert app["deployments"][0]["user_config"]["pipeline_dir"] == design_app.default_pipeline_dir(loaded)


def test_rayservice_and_serve_reward_describe_the_same_app():
    ours, theirs = (_serve_apps()[k]["applications"][0] for k in ("rayservice", "serve_reward"))
    for key in ("name", "route_prefix", "import_path"):
        assert ours[key] == theirs[key]
    assert ours["deployments"][0]["name"] == theirs["deployments"][0]["name"]


def test_kuberay_specs_agree_and_use_known_resources():
    specs = {name: _cluster_spec(name) for name in KUBERAY}
    assert specs["rayjob_align"] == specs["raycluster"] == specs["rayservice_reward"]
    spec = specs["raycluster"]
    assert spec["rayVersion"] == _ray_version()
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            for kind in ("limits", "requests"):
                assert set(container["resources"][kind]) <= K8S_RESOURCES


def _gpu_config():
    config = load_config(GPU_CONFIG)
    runs = [run for run in (config.rm, config.align) if run.use_gpu]
    assert runs, "configs/sd15.yaml trains on GPUs"
    return config, max(run.num_workers for run in runs)


def test_kuberay_gpu_capacity_covers_num_workers():
    _, needed = _gpu_config()
    for name in KUBERAY:
        spec = _cluster_spec(name)
        gpus = cpus = 0
        for group in spec["workerGroupSpecs"]:
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            count = int(group.get("maxReplicas", group["replicas"]))
            gpus += count * int(limits.get("nvidia.com/gpu", 0))
            cpus += count * float(limits["cpu"])
        # Ray Train with use_gpu and no resources_per_worker: 1 GPU + 1 CPU per worker.
        assert gpus >= needed and cpus >= needed, (name, gpus, cpus, needed)
        # One job's workers fit on one pod (NCCL within a node), so a single replica already suffices.
        assert max(int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
                   for g in spec["workerGroupSpecs"]) >= needed


def test_launcher_gpu_capacity_and_resource_names():
    _, needed = _gpu_config()
    launcher = _load(LAUNCHER)
    assert launcher["head_node_type"] in launcher["available_node_types"]
    gpus = 0
    for node_type in launcher["available_node_types"].values():
        assert set(node_type["resources"]) <= RAY_RESOURCES
        gpus += node_type.get("max_workers", 0) * node_type["resources"].get("GPU", 0)
        if node_type["resources"].get("GPU"):
            assert node_type["resources"]["GPU"] >= needed and node_type["resources"]["CPU"] >= needed
    assert gpus >= needed
    assert sum(t.get("max_workers", 0) for t in launcher["available_node_types"].values()) <= launcher["max_workers"]
    assert launcher["docker"]["image"].startswith(f"rayproject/ray:{_ray_version()}-")


def _mounts_kuberay(spec: dict) -> list[list[str]]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [[m["mountPath"] for c in g["template"]["spec"]["containers"] for m in c.get("volumeMounts", [])]
            for g in groups]


def test_config_paths_are_on_every_node():
    config, _ = _gpu_config()
    paths = [config.rm.clip, config.policy.base, config.rm.out, config.align.out]
    assert all(p and p.startswith("/") for p in paths)
    for name in KUBERAY:
        for mounts in _mounts_kuberay(_cluster_spec(name)):
            for path in paths:
                assert any(path.startswith(m.rstrip("/") + "/") for m in mounts), (name, path, mounts)
    launcher = _load(LAUNCHER)
    volumes = [opt.split()[1].split(":")[1] for opt in launcher["docker"]["run_options"] if opt.startswith("-v ")]
    init = "\n".join(launcher["initialization_commands"])
    for path in paths:
        assert any(path.startswith(v.rstrip("/") + "/") for v in volumes), (path, volumes)
    for model in (config.rm.clip, config.policy.base):
        assert model in init, f"the launcher never puts {model} on the nodes"


def test_images_install_this_repo():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(_ray_version())}-\S*gpu", dockerfile, re.M)
    assert "pip install" in dockerfile and "/home/ray/perfusion_ray" in dockerfile
    images = {c["image"] for name in KUBERAY for g in [_cluster_spec(name)["headGroupSpec"],
                                                        *_cluster_spec(name)["workerGroupSpecs"]]
              for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1  # the image cluster/Dockerfile builds
    job = _load(KUBERAY["rayjob_align"])
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["working_dir"] == "/home/ray/perfusion_ray"
    assert job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"] in images
    launcher = _load(LAUNCHER)
    assert "/home/ray/perfusion_ray" in launcher["file_mounts"]
    assert any("pip install" in c and "/home/ray/perfusion_ray" in c for c in launcher["setup_commands"])
