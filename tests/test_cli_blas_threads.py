"""The command keeps numpy's BLAS on one thread (its spinning threads slowed the mapping's small products
several times on a loaded 2-core machine), unless the user chose a number."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import os, sys
sys.argv = ["sfckpt", "--version"]
from sfckpt.__main__ import run
try:
    run()
except SystemExit:
    pass
import numpy  # what the command's numpy was loaded with
print("BLAS", os.environ.get("OPENBLAS_NUM_THREADS"))
"""


@pytest.mark.parametrize("given, expected", [(None, "1"), ("2", "2")], ids=["default-one", "user-choice-kept"])
def test_the_command_sets_one_blas_thread_unless_given(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if given is not None:
        env["OPENBLAS_NUM_THREADS"] = given
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True).stdout
    assert f"BLAS {expected}" in out.splitlines()
