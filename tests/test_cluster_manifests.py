"""cluster/: every manifest validates against the schema of the software that reads it (KubeRay v1.7.0's CRDs,
vendored under tests/schemas/; the launcher schema inside the pinned Ray; Ray Serve's ServeDeploySchema), and
everything it names exists: entrypoint scripts, python import paths (imported, attribute looked up), config
files (loaded and validated, `--set` overrides included), the paths configs/sd15.yaml uses (mounted on every
node), resource names; token auth is on; and the GPUs it offers cover the configs' Train workers and Serve
replicas. No cluster, no network: seconds."""

from __future__ import annotations

import copy
import functools
import gzip
import importlib
import json
import re
from pathlib import Path

import pytest
import yaml

from perfusion_ray.config import load_config
from perfusion_ray.serve import reward_app

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER = CLUSTER / "aws_gpu.yaml"
KUBERAY = {name: CLUSTER / f"{name}.yaml" for name in ("raycluster", "rayjob_align", "rayservice")}
SERVE_FILES = {name: CLUSTER / f"{name}.yaml" for name in ("serve_reward", "serve_design")}
MANIFESTS = [LAUNCHER, *KUBERAY.values(), *SERVE_FILES.values()]
KUBERAY_SCHEMAS = REPO / "tests" / "schemas" / "kuberay-v1.7.0"
KUBERAY_CRDS = {"RayCluster": "ray.io_rayclusters.yaml.gz", "RayJob": "ray.io_rayjobs.yaml.gz",
                "RayService": "ray.io_rayservices.yaml.gz"}
GPU_CONFIG = REPO / "configs" / "sd15.yaml"
GPU_CONFIGS = [GPU_CONFIG, REPO / "configs" / "sdxl.yaml"]
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


def _serve_configs() -> dict[str, dict]:
    """Every Serve config file in cluster/, the RayService's serveConfigV2 among them."""
    service = _load(KUBERAY["rayservice"])
    return {"rayservice": yaml.safe_load(service["spec"]["serveConfigV2"]),
            **{name: _load(path) for name, path in SERVE_FILES.items()}}


def _serve_kinds():
    from perfusion_ray.serve import design_app

    # import path -> (the module, the builder's args, the user_config key, the config section of the app)
    return {reward_app.IMPORT_PATH: (reward_app, {"config", "set", "model_dir"}, "model_dir", lambda c: c.serve),
            design_app.IMPORT_PATH: (design_app, {"config", "set", "pipeline_dir"}, "pipeline_dir",
                                     lambda c: c.design)}


@pytest.mark.parametrize("which", ["rayservice", "serve_reward", "serve_design"])
def test_serve_configs_validate_against_serves_schema_and_match_the_package(which):
    from ray.serve.schema import ServeDeploySchema

    config = _serve_configs()[which]
    ServeDeploySchema.model_validate(config)  # Ray Serve's own schema: raises on any violation
    kinds = _serve_kinds()
    for app in config["applications"]:
        module, builder_args, folder_key, section = kinds[app["import_path"]]
        assert [d["name"] for d in app["deployments"]] == [module.DEPLOYMENT_NAME]
        assert set(app["args"]) <= builder_args
        assert set(app["deployments"][0]["user_config"]) == {folder_key}
        loaded = load_config(REPO / app["args"]["config"], app["args"].get("set") or [])  # overrides validate
        assert app["name"] == section(loaded).app_name and app["route_prefix"] == section(loaded).route_prefix
        assert config["http_options"] == {"host": loaded.serve.host, "port": loaded.serve.port}
        folder = app["deployments"][0]["user_config"][folder_key]
        if which == "rayservice":  # the GPU config's exports, on the shared volume
            expected = Path(loaded.rm.out) / "model" if folder_key == "model_dir" else Path(loaded.online.out) / "pipeline"
            assert folder == str(expected) and folder.startswith("/mnt/shared/")
        elif folder_key == "pipeline_dir":
            assert folder == module.default_pipeline_dir(loaded)


def test_the_rayservice_serves_the_apps_of_the_serve_files():
    service = {app["import_path"]: app for app in _serve_configs()["rayservice"]["applications"]}
    files = [_serve_configs()[name]["applications"][0] for name in SERVE_FILES]
    assert set(service) == {app["import_path"] for app in files}  # one proxy, every app
    for theirs in files:
        ours = service[theirs["import_path"]]
        assert {k: ours[k] for k in ("name", "route_prefix")} == {k: theirs[k] for k in ("name", "route_prefix")}
        assert ours["deployments"][0]["name"] == theirs["deployments"][0]["name"]
    assert _serve_configs()["serve_design"]["http_options"] == _serve_configs()["serve_reward"]["http_options"]


def test_kuberay_specs_agree_and_use_known_resources():
    specs = {name: _cluster_spec(name) for name in KUBERAY}
    assert specs["rayjob_align"] == specs["raycluster"] == specs["rayservice"]
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


# ---------------------------------------------------------------- KubeRay's CRD schemas
@functools.cache
def _crd_schema(kind: str) -> dict:
    """The v1 openAPIV3Schema of KubeRay's CRD for `kind` (tests/schemas/kuberay-v1.7.0/README.md)."""
    crd = yaml.load(gzip.decompress((KUBERAY_SCHEMAS / KUBERAY_CRDS[kind]).read_bytes()), Loader=yaml.CSafeLoader)
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert version["served"] and crd["spec"]["group"] == "ray.io"
    return version["schema"]["openAPIV3Schema"]


def _unknown_fields_refused(schema):
    """The schema as `kubectl apply` (field validation Strict) applies it: a field the schema does not declare is
    an error. A structural schema leaves undeclared fields to be pruned, which jsonschema would let pass."""
    if isinstance(schema, list):
        return [_unknown_fields_refused(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _unknown_fields_refused(value) for key, value in schema.items()}
    if "properties" in strict and "additionalProperties" not in strict \
            and not strict.get("x-kubernetes-preserve-unknown-fields"):
        strict["additionalProperties"] = False
    return strict


@functools.cache
def _strict_crd_schema(kind: str) -> dict:
    return _unknown_fields_refused(_crd_schema(kind))


def crd_violations(document: dict) -> list[str]:
    """Every place `document` breaks its KubeRay CRD, as `path: message` (empty: it validates)."""
    import jsonschema

    if document.get("kind") not in KUBERAY_CRDS or document.get("apiVersion") != "ray.io/v1":
        return [f"apiVersion/kind: {document.get('apiVersion')}/{document.get('kind')} is not a KubeRay v1 kind"]
    validator = jsonschema.Draft7Validator(_strict_crd_schema(document["kind"]))
    return sorted(f"{'.'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}"
                  for error in validator.iter_errors(document))


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_manifests_validate_against_kuberays_crds(name):
    assert crd_violations(_load(KUBERAY[name])) == []


def test_the_crd_check_finds_a_typo_and_a_wrong_type():
    broken = _load(KUBERAY["raycluster"])
    broken["spec"]["authOption"] = broken["spec"].pop("authOptions")  # a typo: pruned by Kubernetes, silently
    broken["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "2"
    violations = crd_violations(broken)
    assert any(v.startswith("spec:") and "'authOption'" in v for v in violations), violations
    assert any(v.startswith("spec.workerGroupSpecs.0.maxReplicas:") for v in violations), violations


def _rule_paths(schema: dict, path: tuple = ()):
    """Paths of the fields that carry CEL rules (x-kubernetes-validations), '*' for list items."""
    if "x-kubernetes-validations" in schema:
        yield path
    for key, child in (schema.get("properties") or {}).items():
        yield from _rule_paths(child, path + (key,))
    if isinstance(schema.get("items"), dict):
        yield from _rule_paths(schema["items"], path + ("*",))


def _has(document, path: tuple) -> bool:
    if not path:
        return True
    if path[0] == "*":
        return isinstance(document, list) and any(_has(item, path[1:]) for item in document)
    return isinstance(document, dict) and path[0] in document and _has(document[path[0]], path[1:])


@pytest.mark.parametrize("name", KUBERAY)
def test_no_manifest_sets_a_field_whose_cel_rule_goes_unchecked_here(name):
    # jsonschema does not evaluate CEL; the rules of v1.7.0 sit on fields (managedBy, deletionStrategy, gcs
    # fault tolerance, the status) these manifests leave unset, so the API server has nothing more to refuse.
    document = _load(KUBERAY[name])
    rules = list(_rule_paths(_crd_schema(document["kind"])))
    assert rules  # the walk finds them
    assert [path for path in rules if path and _has(document, path)] == []


def test_every_kuberay_cluster_runs_with_token_auth():
    for name in KUBERAY:
        spec = _cluster_spec(name)
        assert spec["authOptions"] == {"mode": "token", "secretName": "perfusion-ray-token"}, name
        # KubeRay's own admission rule (ray-operator/controllers/ray/utils/validation.go): token mode needs Ray 2.52+
        assert tuple(map(int, spec["rayVersion"].split("."))) >= (2, 52, 0)


# ---------------------------------------------------------------- Ray's cluster launcher schema
def _launcher_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def launcher_violations(config: dict) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(_launcher_schema())
    return sorted(f"{'.'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}"
                  for error in validator.iter_errors(config))


def test_launcher_validates_against_rays_schema_as_ray_up_does():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load(LAUNCHER)
    assert launcher_violations(config) == []
    validate_config(prepare_config(copy.deepcopy(config)))  # `ray up`: defaults filled in, then Ray's own checks


def test_the_launcher_check_finds_a_typo():
    broken = _load(LAUNCHER)
    broken["available_node_types"]["gpu_worker"]["max_worker"] = 2
    assert any("max_worker" in v for v in launcher_violations(broken))


def test_the_launcher_runs_every_ray_process_with_token_auth():
    launcher = _load(LAUNCHER)
    options = launcher["docker"]["run_options"]
    assert "-e RAY_AUTH_MODE=token" in options
    (path,) = [o.split("=", 1)[1] for o in options if o.startswith("-e RAY_AUTH_TOKEN_PATH=")]
    mounts = {o.split()[1].split(":")[1]: o.split()[1].split(":")[0] for o in options if o.startswith("-v ")}
    folder = str(Path(path).parent)
    assert folder in mounts, "the token file is not mounted into the container"
    assert any(f"{mounts[folder]}/{Path(path).name}" in c for c in launcher["initialization_commands"])


# ---------------------------------------------------------------- GPUs for Serve replicas
def _replicas(config) -> list[tuple[str, int, float, float]]:
    """(app, max replicas, CPUs, GPUs per replica) of the config's two apps."""
    return [(section.app_name, section.max_replicas, section.replica_cpus, section.replica_gpus)
            for section in (config.serve, config.design)]


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=lambda p: p.name)
def test_gpu_configs_put_serve_replicas_on_gpus(path):
    config = load_config(path)
    assert all(gpus > 0 for _, _, _, gpus in _replicas(config))
    assert config.serve.replica_dtype != "float32" and config.design.replica_dtype != "float32"


def _worker_pods(spec: dict) -> list[tuple[int, float, float]]:
    """(max pods, CPUs, GPUs) of each KubeRay worker group."""
    out = []
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        out.append((int(group.get("maxReplicas", group["replicas"])), float(limits["cpu"]),
                    float(limits.get("nvidia.com/gpu", 0))))
    return out


def test_kuberay_gpus_cover_the_serve_replicas_beside_the_train_workers():
    config, train_gpus = _gpu_config()
    serving = sum(count * gpus for _, count, _, gpus in _replicas(config))
    for name in KUBERAY:
        pods = _worker_pods(_cluster_spec(name))
        for app, _, cpus, gpus in _replicas(config):  # a replica fits one pod
            assert any(pod_cpus >= cpus and pod_gpus >= gpus for _, pod_cpus, pod_gpus in pods), (name, app)
        # The rounds (RayJob) run the reward app beside the training workers; the RayService runs both apps.
        needed = {"rayjob_align": train_gpus + config.serve.max_replicas * config.serve.replica_gpus,
                  "rayservice": serving, "raycluster": train_gpus + serving}[name]
        assert sum(count * gpus for count, _, gpus in pods) >= needed, (name, needed)
