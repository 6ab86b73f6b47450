"""The cluster recipes, checked the way their consumers check them: the Ray cluster launcher's own
preparation and validation (`ray up` runs both before it starts a node), and the KubeRay CRDs'
OpenAPI schemas with the API server's strict field validation. Plus what makes them safe to deploy
(token authentication, nothing exposed) and runnable (every `acedist` command in them parses)."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CRDS = ROOT.parent / "shared" / "cluster" / "kuberay-crds"
LAUNCHER = ["aws.yaml", "gcp.yaml", "onprem.yaml"]
KUBERAY = ["kuberay/raycluster.yaml", "kuberay/rayjob-prep.yaml", "kuberay/rayjob-train.yaml"]


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


# --- Ray cluster launcher ------------------------------------------------------------------------

def ray_up_checks(config: dict) -> None:
    """What `ray up` does with a config before it touches a cloud: the schema shipped in the ray wheel
    on the file as written, then Ray's preparation (defaults, node types) and its validation."""
    import os

    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_configs_pass_rays_own_validation(name):
    ray_up_checks(_load(name))


@pytest.mark.parametrize("name", LAUNCHER)
def test_a_broken_launcher_config_is_refused(name):
    config = _load(name)
    unknown = dict(config, min_workers=2)  # the mistake the first recipe made
    with pytest.raises(jsonschema.ValidationError, match="min_workers"):
        ray_up_checks(unknown)
    wrong_type = copy.deepcopy(config)
    wrong_type["setup_commands"] = "make install"
    with pytest.raises(jsonschema.ValidationError):
        ray_up_checks(wrong_type)


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_configs_start_ray_with_token_auth_and_a_loopback_dashboard(name):
    config = _load(name)
    head = " ".join(config["head_start_ray_commands"])
    workers = " ".join(config["worker_start_ray_commands"])
    for commands in (head, workers):
        assert "RAY_AUTH_MODE=token ray start" in commands
    assert "--dashboard-host=127.0.0.1" in head
    # the token reaches every node as a file the user made; no token is in the recipe
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "RAY_AUTH_TOKEN" not in (CLUSTER / name).read_text()
    # drivers on the nodes (ray exec, job entrypoints) use the token too
    assert any("export RAY_AUTH_MODE=token" in command for command in config["setup_commands"])


# --- KubeRay --------------------------------------------------------------------------------------

def _strict(schema):
    """The API server rejects unknown fields (kubectl's default field validation is Strict) except
    under x-kubernetes-preserve-unknown-fields; a JSON Schema validator needs that said."""
    if isinstance(schema, dict):
        if (schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        for value in schema.values():
            _strict(value)
    elif isinstance(schema, list):
        for value in schema:
            _strict(value)
    return schema


@pytest.fixture(scope="module")
def crd_schemas() -> dict:
    if not CRDS.is_dir():
        pytest.fail(f"the KubeRay CRDs are missing: {CRDS}")
    schemas = {}
    for path in sorted(CRDS.glob("ray.io_*.yaml")):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
            schemas[key] = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    return schemas


def crd_errors(manifest: dict, schemas: dict) -> list[str]:
    schema = schemas[(manifest["apiVersion"], manifest["kind"])]
    return [f"{'.'.join(map(str, error.absolute_path))}: {error.message}"
            for error in jsonschema.Draft7Validator(schema).iter_errors(manifest)]


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_manifests_pass_the_crd_schemas(name, crd_schemas):
    assert crd_errors(_load(name), crd_schemas) == []


@pytest.mark.parametrize("name", KUBERAY)
def test_a_broken_kuberay_manifest_is_refused(name, crd_schemas):
    manifest = _load(name)
    cluster = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    missing = copy.deepcopy(manifest)
    del missing["spec"].get("rayClusterSpec", missing["spec"])["workerGroupSpecs"][0]["maxReplicas"]
    assert any("'maxReplicas' is a required property" in error for error in crd_errors(missing, crd_schemas))
    typo = copy.deepcopy(manifest)
    typo["spec"].get("rayClusterSpec", typo["spec"])["workerGroupSpecs"][0]["maxReplica"] = 2
    assert any("maxReplica" in error for error in crd_errors(typo, crd_schemas))
    wrong = copy.deepcopy(manifest)
    wrong["spec"].get("rayClusterSpec", wrong["spec"])["authOptions"] = {"mode": "off"}
    assert any("authOptions.mode" in error for error in crd_errors(wrong, crd_schemas))
    assert cluster["authOptions"] == {"mode": "token"}


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_clusters_use_tokens_and_stay_inside_the_cluster_network(name):
    manifest = _load(name)
    cluster = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    text = (CLUSTER / name).read_text()
    assert "RAY_AUTH_MODE: disabled" not in text and "value: disabled" not in text
    claims = {volume["persistentVolumeClaim"]["claimName"]
              for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
              for volume in group["template"]["spec"].get("volumes", []) if "persistentVolumeClaim" in volume}
    assert claims == {_load("kuberay/pvc.yaml")["metadata"]["name"]}
    for group in cluster["workerGroupSpecs"]:
        [container] = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_no_shipped_recipe_disables_authentication():
    for path in sorted(CLUSTER.rglob("*")):
        if path.is_file() and path.suffix in (".yaml", ".yml", ".py", ".md", "") and path.name != "README.md":
            assert "RAY_AUTH_MODE=disabled" not in path.read_text(), path
            assert "RAY_AUTH_MODE: disabled" not in path.read_text(), path


# --- the commands inside the recipes --------------------------------------------------------------

def _acedist_commands() -> list[tuple[str, list[str]]]:
    """Every `acedist ...` command of the recipes: the KubeRay entrypoints and the launcher configs'
    usage comments (the lines a user copies)."""
    found = []
    for name in KUBERAY:
        for part in _load(name)["spec"].get("entrypoint", "").split("&&"):
            if part.strip():
                found.append((name, shlex.split(part)))
    for name in LAUNCHER + KUBERAY:
        # the usage examples: comment lines indented by three spaces, "\\" continuing a line
        examples, current = [], ""
        for line in (CLUSTER / name).read_text().splitlines():
            if line.startswith("#   "):
                current += " " + line[4:].strip()
                if not current.endswith("\\"):
                    examples.append(current)
                    current = ""
                current = current.rstrip("\\")
        for example in examples:
            match = re.search(r"\bacedist (?=(prep|train|export|convert|annotate|inspect|generate) )", example)
            if match:
                found.append((name, shlex.split(example[match.start():].split('"')[0])))
    return found


def test_every_acedist_command_in_the_recipes_parses():
    from acestep_dist.cli import cli
    from acestep_dist.config import PrepConfig, TrainConfig, load_config

    commands = _acedist_commands()
    assert {name for name, _ in commands} >= set(LAUNCHER) | {"kuberay/rayjob-prep.yaml", "kuberay/rayjob-train.yaml"}
    for name, words in commands:
        assert words[0] == "acedist", (name, words)
        command = cli.get_command(None, words[1])
        assert command is not None, (name, words)
        # click checks every option name and value type; nothing runs
        context = command.make_context(words[1], words[2:], resilient_parsing=False)
        overrides = context.params.get("overrides")
        if overrides:  # key=value settings: the recipe's schema checks names and values
            load_config({"prep": PrepConfig, "train": TrainConfig}[words[1]], None, list(overrides))


def test_local_cluster_refuses_to_lose_the_head_and_names_what_is_missing(tmp_path, capsys):
    import local_cluster  # cluster/, on the path by conftest.py

    with pytest.raises(SystemExit) as refused:  # argparse's usage error
        local_cluster.main(["kill-node", "--node", "0", "--temp-dir", str(tmp_path)])
    assert refused.value.code == 2 and "node 0 is the head" in capsys.readouterr().err
    assert local_cluster.main(["rejoin", "--node", "1", "--temp-dir", str(tmp_path)]) == 1
    assert f"no local cluster in {tmp_path}" in capsys.readouterr().err
    (tmp_path / local_cluster.STATE).write_text(json.dumps({"address": "127.0.0.1:1", "pids": [1, 2]}))
    assert local_cluster.main(["kill-node", "--node", "5", "--temp-dir", str(tmp_path)]) == 1
    assert "no node 5: the cluster's nodes are 0-1" in capsys.readouterr().err
