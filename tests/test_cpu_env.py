"""The entry point's malloc tunable (dydit_jax/cpu_env.py): when it is set, and when not."""
import os
import platform
import subprocess
import sys

import pytest

from conftest import ROOT
from dydit_jax import cpu_env

glibc_linux = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                                 reason="a glibc tunable")


@glibc_linux
def test_tunable_added_to_the_environment():
    env = cpu_env.tuned_environment({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": cpu_env.TUNABLES}
    env = cpu_env.tuned_environment({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=512"})
    assert env["GLIBC_TUNABLES"] == "glibc.rtld.optional_static_tls=512:" + cpu_env.TUNABLES


def test_user_settings_and_opt_out_are_respected():
    assert cpu_env.tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}) is None
    assert cpu_env.tuned_environment({cpu_env.OPT_OUT: "0"}) is None


@glibc_linux
def test_entry_point_runs_with_the_tunable():
    """`python -m dydit_jax.main` re-executes itself with the tunable, the same arguments and
    no loop: the re-executed process sees GLIBC_TUNABLES and reaches absl's flag parsing (a
    missing --config is a usage error naming the flag)."""
    code = ("import os, sys, runpy; print('TUNABLES=' + os.environ.get('GLIBC_TUNABLES', ''),"
            " flush=True); sys.argv = ['main'] + sys.argv[1:];"
            " runpy.run_module('dydit_jax.main', run_name='__main__')")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", cpu_env.OPT_OUT)}
    res = subprocess.run([sys.executable, "-c", code, "--workdir=/nonexistent"], cwd=ROOT,
                         env=dict(env, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                         timeout=120)
    lines = [l for l in res.stdout.splitlines() if l.startswith("TUNABLES=")]
    assert lines == ["TUNABLES=", "TUNABLES=" + cpu_env.TUNABLES], res.stdout + res.stderr
    assert "--config" in res.stderr and res.returncode != 0
