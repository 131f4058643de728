"""The engine examples under ``examples/`` parse, and run the command they promise.

Each example's command is executed for real by its shell with stub ``apimart`` and
``pip`` programs on ``PATH`` that record their arguments, in the environment the engine
gives each worker; the recorded ``apimart`` command line must parse with the real
parser, and ``--shard auto`` must resolve to a different shard in every worker.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from apimart_async.cli._args import build_parser
from apimart_async.cli._shard import Shard, parse_shard

yaml = pytest.importorskip("yaml")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
posix_shell = pytest.mark.skipif(
    sys.platform == "win32" or shutil.which("sh") is None or shutil.which("bash") is None,
    reason="needs a POSIX shell",
)


def _stubs(tmp_path: Path) -> tuple[Path, Path]:
    """A bin folder whose ``apimart`` and ``pip`` append their argv (JSON) to a log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.jsonl"
    for name in ("apimart", "pip"):
        stub = bin_dir / name
        stub.write_text(
            f"#!{sys.executable}\n"
            "import json, os, sys\n"
            f"with open({str(log)!r}, 'a') as fh:\n"
            "    fh.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + '\\n')\n"
        )
        stub.chmod(0o755)
    return bin_dir, log


def _calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def _shard_of(argv: list[str], env: dict[str, str]) -> Shard:
    with mock.patch.dict(os.environ, env):  # --shard auto is checked as it is parsed
        args = build_parser().parse_args(argv)
    assert args.command == "batch" and args.shard == "auto"
    return parse_shard(args.shard, env)


def _documents() -> list[dict[str, Any]]:
    text = (EXAMPLES / "kubernetes" / "indexed-job.yaml").read_text()
    return [doc for doc in yaml.safe_load_all(text) if doc]


def test_the_kubernetes_manifest_is_an_indexed_job_on_a_shared_volume() -> None:
    """Indexed, completions = parallelism = JOB_COMPLETIONS, replacement only once a pod
    has failed, exit statuses 2 and 3 fail the Job, a ReadWriteMany claim mounted."""
    docs = _documents()
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    jobs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Job"}
    batch = jobs["apimart-batch"]["spec"]
    assert batch["completionMode"] == "Indexed"
    assert batch["completions"] == batch["parallelism"] == 4
    assert batch["podReplacementPolicy"] == "Failed"
    rule = batch["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "FailJob" and set(rule["onExitCodes"]["values"]) == {2, 3}
    pod = batch["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["JOB_COMPLETIONS"]["value"] == str(batch["completions"])
    assert "secretKeyRef" in env["APIMART_API_KEY"]["valueFrom"]
    claim = pod["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert "ReadWriteMany" in claims[claim]["spec"]["accessModes"]
    assert container["volumeMounts"][0]["mountPath"] == "/data"
    merge = jobs["apimart-merge"]["spec"]["template"]["spec"]
    assert merge["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim


@posix_shell
def test_every_kubernetes_index_runs_its_own_shard(tmp_path: Path) -> None:
    """The container's command, run by sh in each index's environment, starts
    ``apimart batch ... --shard auto`` on the shared folder, shard K for index K."""
    docs = _documents()
    batch = next(d for d in docs if d["metadata"]["name"] == "apimart-batch")["spec"]
    container = batch["template"]["spec"]["containers"][0]
    bin_dir, log = _stubs(tmp_path)
    shards = set()
    for index in range(batch["completions"]):
        env = {
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "JOB_COMPLETION_INDEX": str(index),
            "JOB_COMPLETIONS": container["env"][0]["value"],
            "APIMART_API_KEY": "sk-test",
        }
        subprocess.run([*container["command"], *container["args"]], env=env, check=True)
        argv = _calls(log)[-1]
        assert argv[0] == "apimart"
        shards.add(_shard_of(argv[1:], env))
        assert argv[argv.index("--out") + 1].startswith("/data/")
    assert shards == {Shard(k, 4) for k in range(4)}
    merge = next(d for d in docs if d["metadata"]["name"] == "apimart-merge")
    merge_container = merge["spec"]["template"]["spec"]["containers"][0]
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run([*merge_container["command"], *merge_container["args"]], env=env, check=True)
    merged = build_parser().parse_args(_calls(log)[-1][1:])
    assert merged.command == "merge" and merged.dir == "/data/out"


@posix_shell
def test_every_slurm_array_task_runs_its_own_shard(tmp_path: Path) -> None:
    """The sbatch script passes ``bash -n``, declares a contiguous array, and run as each
    array task starts ``apimart batch ... --shard auto`` as shard K of N."""
    script = EXAMPLES / "slurm" / "apimart-array.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    array = re.search(r"^#SBATCH --array=(\d+)-(\d+)$", text, re.MULTILINE)
    assert array is not None and "#SBATCH --requeue" in text
    first, last = int(array[1]), int(array[2])
    bin_dir, log = _stubs(tmp_path)
    shards = set()
    for task in range(first, last + 1):
        env = {
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "HOME": str(tmp_path),
            "APIMART_API_KEY": "sk-test",
            "SLURM_ARRAY_TASK_ID": str(task),
            "SLURM_ARRAY_TASK_MIN": str(first),
            "SLURM_ARRAY_TASK_COUNT": str(last - first + 1),
        }
        subprocess.run(["bash", str(script)], env=env, check=True)
        argv = _calls(log)[-1]
        shards.add(_shard_of(argv[1:], env))
        assert argv[argv.index("--batch-id") + 1] == "jobs-v1"
    assert shards == {Shard(k, last - first + 1) for k in range(last - first + 1)}
    missing_key = subprocess.run(
        ["bash", str(script)],
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing_key.returncode != 0 and "APIMART_API_KEY" in missing_key.stderr
