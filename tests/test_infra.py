"""infra/: offline checks that the cluster files, the image and the pod launcher refer only to
what exists (gx subcommands, config keys, repo paths) and pass the schemas we can check here."""

import copy
import re
import shlex
import subprocess
from pathlib import Path

import yaml

from gemini_core.experiment import config_overrides, load_experiment
from gx import cli

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
SCRIPT = INFRA / "tpu_pod_launch.sh"
IMAGE_REPO = "/opt/gemini-core/"  # where infra/Dockerfile installs the repository
FILES = ["ray-tpu-gcp.yaml", "kuberay-rayjob.yaml", "Dockerfile", "tpu_pod_launch.sh",
         "README.md"]


def _text(name: str) -> str:
    return (INFRA / name).read_text()


def _subcommands() -> set[str]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return set(sub.choices)


def _gx_argv(words: list[str]) -> list[str]:
    """The arguments of the first `gx` (or `.../gx`) in a command line."""
    i = next(i for i, w in enumerate(words) if w == "gx" or w.endswith("/gx"))
    return words[i + 1:]


def _check_gx(argv: list[str]):
    """Parses a gx command line with the real CLI parser; returns (args, overrides)."""
    overrides, rest = config_overrides(argv)
    return cli.build_parser().parse_args(rest), overrides


def _repo_path(spec: str) -> str:
    """An experiment spec as the repo sees it: the image's /opt/gemini-core/ and ~/gemini-core/
    are this repository."""
    for prefix in (IMAGE_REPO, "~/gemini-core/"):
        if spec.startswith(prefix):
            return str(REPO / spec[len(prefix):])
    return str(REPO / spec)


def test_files_exist_and_script_is_executable():
    for name in FILES:
        assert (INFRA / name).is_file(), name
    assert SCRIPT.stat().st_mode & 0o111


def test_ray_cluster_yaml_passes_rays_own_schema():
    from ray._private.accelerators import TPUAcceleratorManager
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load(_text("ray-tpu-gcp.yaml"))
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type"):
        assert key in cfg, key
    assert cfg["provider"]["type"] == "gcp"
    validate_config(prepare_config(copy.deepcopy(cfg)))  # what `ray up` runs before any cloud call
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]["node_config"]
    assert "machineType" in head  # a TPU cannot be the head
    tpus = {name: t for name, t in types.items() if "acceleratorType" in t["node_config"]}
    assert tpus, "no TPU worker type"
    for name, t in tpus.items():
        node = t["node_config"]
        assert TPUAcceleratorManager.is_valid_tpu_accelerator_type(node["acceleratorType"]), name
        assert node["runtimeVersion"] and "machineType" not in node, name
        assert t["resources"]["TPU"] > 0, name
    setup = "\n".join(cfg["setup_commands"])
    assert "pip install" in setup and "-e ~/gemini-core" in setup
    assert cfg["file_mounts"]["~/gemini-core"] == "."  # the repo, synced from where `ray up` runs
    assert any("jax[tpu]" in c for c in cfg["worker_setup_commands"])


def test_rayjob_manifest_has_what_kuberay_requires():
    docs = list(yaml.safe_load_all(_text("kuberay-rayjob.yaml")))
    job = next(d for d in docs if d["kind"] == "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["entrypoint"].strip()
    cluster = spec["rayClusterSpec"]
    groups = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    for group in groups:
        pod = group["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            assert c["image"] and c["name"]
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, m  # every mount has its volume
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims
    for g in cluster["workerGroupSpecs"]:
        assert g["groupName"] and g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    # a single command: KubeRay pastes it into the submitter's shell line
    assert not re.search(r"&&|;|\|", spec["entrypoint"])


def test_rayjob_entrypoint_is_a_valid_sweep():
    from sweeps import config as sweep_config

    job = next(d for d in yaml.safe_load_all(_text("kuberay-rayjob.yaml"))
               if d["kind"] == "RayJob")
    args, overrides = _check_gx(_gx_argv(shlex.split(job["spec"]["entrypoint"])))
    assert args.command == "sweep"
    exp = load_experiment(_repo_path(args.experiment), overrides,
                          schema=sweep_config.SweepConfig, convert=sweep_config.from_config_dict)
    assert sweep_config.proxy_config(exp.config).data.root == "/shared/corpus"
    assert exp.config.resources.max_concurrent == 16


def test_every_gx_command_named_in_infra_is_real():
    real = _subcommands()
    seen = set()
    for name in FILES:
        for m in re.finditer(r"(?<![\w/$.-])gx\s+(?:--runs-root\s+\S+\s+)?([a-z][\w-]*)",
                             _text(name)):
            seen.add(m.group(1))
            assert m.group(1) in real, f"{name}: gx {m.group(1)} is not a gx command"
    assert {"run", "sweep"} <= seen


def test_every_repo_path_named_in_infra_exists():
    pattern = re.compile(r"(?<![\w-])((?:experiments|infra|gemini_core|sweeps|bench|tests)"
                         r"/[\w./-]*\w)")
    for name in FILES:
        for m in pattern.finditer(_text(name)):
            path = m.group(1).split(":")[0]
            assert (REPO / path).exists(), f"{name} names {path}, which does not exist"


def test_dockerfile_copy_sources_exist():
    lines = [line.split() for line in _text("Dockerfile").splitlines()
             if line.startswith("COPY ")]
    assert lines
    for words in lines:
        for src in [w for w in words[1:-1] if not w.startswith("--")]:
            assert (REPO / src).exists(), f"COPY {src}: not in the repo (build context = root)"
    assert re.search(r'^ENTRYPOINT \["gx"\]', _text("Dockerfile"), re.M)


def test_ray_versions_agree():
    import ray
    docker = re.search(r"^ARG RAY_VERSION=(\S+)", _text("Dockerfile"), re.M).group(1)
    job = next(d for d in yaml.safe_load_all(_text("kuberay-rayjob.yaml"))
               if d["kind"] == "RayJob")
    gcp = re.search(r'"ray\[[\w,]+\]==([\d.]+)"', _text("ray-tpu-gcp.yaml")).group(1)
    assert docker == job["spec"]["rayClusterSpec"]["rayVersion"] == gcp == ray.__version__


def test_launch_script_syntax_help_and_errors():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    assert "set -euo pipefail" in SCRIPT.read_text()
    out = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("usage: infra/tpu_pod_launch.sh")
    for argv, message in ((["experiments/pretrain.py"], "name the hosts"),
                          (["--tpu", "t", "--mesh", "2d", "x.py"], "--mesh 2d"),
                          (["--tpu", "t"], "EXPERIMENT missing"),
                          (["--tpu", "t", "--bogus", "x.py"], "unknown option --bogus")):
        bad = subprocess.run([str(SCRIPT), "--print", *argv], capture_output=True, text=True)
        assert bad.returncode == 2 and message in bad.stderr, (argv, bad.stderr)


def _printed(*argv: str) -> list[list[str]]:
    out = subprocess.run([str(SCRIPT), "--print", *argv], capture_output=True, text=True,
                         check=True)
    return [shlex.split(line) for line in out.stdout.splitlines()]


def _remote_gx(words: list[str]) -> list[str]:
    """The gx argv inside a printed ssh / gcloud line's remote command."""
    remote = next(w[len("--command="):] for w in words if w.startswith("--command=")) \
        if words[0] == "gcloud" else words[-1]
    return _gx_argv(shlex.split(remote))


def test_launch_script_commands_tpu_mode():
    lines = _printed("--tpu", "pod", "--zone", "us-central2-b", "--mesh", "fsdp", "--setup",
                     "experiments/pretrain.py:size=nano,d=256", "--",
                     "--config.data.root=/mnt/shared/corpus")
    assert [w[:5] for w in lines] == [
        ["gcloud", "compute", "tpus", "tpu-vm", "scp"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
    assert all("--worker=all" in w and "--zone=us-central2-b" in w for w in lines)
    args, overrides = _check_gx(_remote_gx(lines[-1]))
    assert args.command == "run"
    assert args.experiment == "experiments/pretrain.py:size=nano,d=256"
    assert "--config.distributed.mode=auto" in overrides
    assert "--config.mesh.preset=fsdp" in overrides
    assert "--config.data.root=/mnt/shared/corpus" in overrides
    assert not any("process_id" in o or "coordinator" in o for o in overrides)


def test_launch_script_settings_are_valid_config_keys():
    """Every host's command line, through the real loader: the keys exist and take the values."""
    lines = _printed("--hosts", "h0,me@h1,h2", "--port", "1234", "--mesh", "fsdp_tp",
                     "--runs-root", "/mnt/shared/runs", "experiments/pretrain.py:size=nano,d=256",
                     "--", "--config.train.log_every=7")
    assert [w[:2] for w in lines] == [["ssh", "h0"], ["ssh", "me@h1"], ["ssh", "h2"]]
    for i, words in enumerate(lines):
        args, overrides = _check_gx(_remote_gx(words))
        assert args.command == "run" and args.runs_root == "/mnt/shared/runs"
        cfg = load_experiment(_repo_path(args.experiment), overrides).config
        assert cfg.distributed.coordinator_address == "h0:1234"
        assert (cfg.distributed.num_processes, cfg.distributed.process_id) == (3, i)
        assert cfg.mesh.preset == "fsdp_tp" and cfg.train.log_every == 7
    tpu = _printed("--tpu", "pod", "experiments/pretrain.py:size=nano,d=256")
    args, overrides = _check_gx(_remote_gx(tpu[-1]))
    assert load_experiment(_repo_path(args.experiment), overrides).config.distributed.mode == "auto"
