"""deploy/aws/{p4d,p5,g6e}.yaml through SkyPilot's own parser (sky.Task), offline and without cloud credentials.

SkyPilot is a hard requirement of this test (pip install skypilot). It runs in a subprocess with HOME set to a
temporary folder, so importing sky leaves nothing in the real ~/.sky; `accelerators` (not `instance_type`) keeps
the check offline, because instance types are looked up in a catalog that SkyPilot downloads on first use.
SkyPilot pins click<8.2 while huggingface_hub 1.x+ needs click>=8.4, so it may live in a venv of its own:
SKYPILOT_PYTHON=/path/to/that/venv/bin/python selects the interpreter that parses (default: this one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
AWS = ROOT / "deploy" / "aws"
TARGETS = {"p4d": {"A100": 8}, "p5": {"H100": 8}, "g6e": {"L40S": 1}}
FAKE_TOKEN = "hf_notarealtoken123"

PARSE = r"""
import json, sys
import yaml
import sky

token = sys.stdin.read()
out = {}
for path in sys.argv[1:]:
    try:
        sky.Task.from_yaml(path)  # what `sky jobs launch FILE` does without --env BUCKET=...
        missing = None
    except ValueError as err:
        missing = str(err)
    with open(path) as f:
        config = yaml.safe_load(f)
    # what `sky jobs launch FILE --env BUCKET=test-bucket --secret HF_TOKEN` does
    task = sky.Task.from_yaml_config(config, env_overrides=[("BUCKET", "test-bucket")],
                                     secrets_overrides=[("HF_TOKEN", token)])
    (res,) = task.resources
    out[path] = {
        "name": task.name, "missing_bucket_error": missing, "cloud": str(res.cloud),
        "accelerators": res.accelerators, "use_spot": res.use_spot, "job_recovery": res.job_recovery,
        "disk_size": res.disk_size, "num_nodes": task.num_nodes, "envs": task.envs,
        "secrets_shown": {k: str(v) for k, v in task.secrets.items()},
        "secret_reaches_node": task.envs_and_secrets["HF_TOKEN"].get_secret_value()
        if hasattr(task.envs_and_secrets["HF_TOKEN"], "get_secret_value") else task.envs_and_secrets["HF_TOKEN"],
        "setup": task.setup, "run": task.run, "workdir": task.workdir,
    }
# the same parser must reject a typo, or the checks above prove nothing
config = yaml.safe_load(open(sys.argv[1]))
config["resources"]["use_spots"] = config["resources"].pop("use_spot")
try:
    sky.Task.from_yaml_config(config, env_overrides=[("BUCKET", "b")])
    out["typo_error"] = None
except Exception as err:
    out["typo_error"] = f"{type(err).__name__}: {err}"
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def parsed(tmp_path_factory) -> dict[str, dict]:
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "HOME": str(home), "SKYPILOT_DISABLE_USAGE_COLLECTION": "1"}
    paths = [str(AWS / f"{t}.yaml") for t in TARGETS]
    python = os.environ.get("SKYPILOT_PYTHON", sys.executable)
    proc = subprocess.run([python, "-c", PARSE, *paths], input=FAKE_TOKEN, capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    if "No module named 'sky'" in proc.stderr:
        pytest.fail(f"SkyPilot is required for this check (its own parser validates the files): pip install skypilot "
                    f"into {python}'s environment, or point SKYPILOT_PYTHON at an interpreter that has it")
    assert proc.returncode == 0, f"SkyPilot failed to parse the task files:\n{proc.stderr[-3000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {Path(p).stem: v for p, v in result.items()}


def test_parser_rejects_a_typo(parsed):
    assert parsed["typo_error"] and "use_spots" in parsed["typo_error"]


@pytest.mark.parametrize("target", TARGETS)
def test_task_file_is_valid_for_skypilot(parsed, target):
    task = parsed[target]
    assert task["name"] == f"rn50-{target}"
    assert task["cloud"] == "AWS"
    assert task["accelerators"] == TARGETS[target]
    assert task["use_spot"] is True
    assert task["job_recovery"]["recover_on_exit_codes"] == [75]  # bootstrap.sh's exit after a spot notice
    assert task["num_nodes"] == 1
    assert task["workdir"] == "."
    assert task["envs"]["BUCKET"] == "test-bucket" and task["envs"]["TARGET"] == target
    assert task["setup"].strip() == "bash deploy/aws/bootstrap.sh setup"
    assert task["run"].strip() == "bash deploy/aws/bootstrap.sh train"


@pytest.mark.parametrize("target", TARGETS)
def test_bucket_is_required(parsed, target):
    assert "BUCKET" in parsed[target]["missing_bucket_error"]


@pytest.mark.parametrize("target", TARGETS)
def test_hf_token_is_a_redacted_secret_not_an_env(parsed, target):
    task = parsed[target]
    assert "HF_TOKEN" not in task["envs"]
    assert FAKE_TOKEN not in task["secrets_shown"]["HF_TOKEN"]
    assert task["secret_reaches_node"] == FAKE_TOKEN


def test_task_files_differ_only_in_target():
    """Three files, one task: everything but name, accelerators and TARGET must stay identical."""
    configs = {t: yaml.safe_load((AWS / f"{t}.yaml").read_text()) for t in TARGETS}
    for config in configs.values():
        del config["name"], config["resources"]["accelerators"], config["envs"]["TARGET"]
    first, *rest = configs.values()
    assert all(c == first for c in rest)
    assert "instance_type" not in first["resources"]  # would need SkyPilot's online catalog to validate
