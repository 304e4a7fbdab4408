"""host_memory.py: with ``keep`` a freed large block's pages serve the next allocation (no page faults)."""

import os
import subprocess
import sys

import pytest

from tipstorch.train.host_memory import DEFAULT, KEEP, _glibc_mallopt, use_host_memory

BLOCK_FLOATS = 16 * 2**20  # 64 MB: above glibc's largest mmap threshold


# Run in a fresh process: in the test process, earlier tests (a Trainer sets ``keep``) leave large free chunks
# in malloc's heap, which serve a 64 MB block without faults under either policy.
MEASURE = """
import resource, sys, torch
from tipstorch.train.host_memory import use_host_memory
assert use_host_memory(sys.argv[1])
for _ in range(3):  # the heap grows to its working size
    torch.ones({floats})
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    torch.ones({floats})
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults_of_reallocations(policy: str) -> int:
    """Minor page faults of allocating, filling and freeing a 64 MB tensor 3 times after 3 others, in a
    new process under ``policy``."""
    script = MEASURE.format(floats=BLOCK_FLOATS)
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", script, policy], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(_glibc_mallopt() is None, reason="glibc malloc only")
def test_keep_reuses_the_pages_of_a_freed_block_and_default_faults_them_in_again():
    default_faults = page_faults_of_reallocations(DEFAULT)
    kept_faults = page_faults_of_reallocations(KEEP)
    assert default_faults >= 3 * 30  # at least a fault per 2 MB huge page per cycle
    assert kept_faults < default_faults / 10


def test_an_unknown_policy_is_refused_by_name():
    with pytest.raises(ValueError, match="host memory policy must be one of .*got 'cache'"):
        use_host_memory("cache")
