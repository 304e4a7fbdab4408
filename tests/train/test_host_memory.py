"""host_memory.py: with ``keep`` a freed large block's pages serve the next allocation (no page faults)."""

import resource

import pytest
import torch

from tipstorch.train.host_memory import DEFAULT, KEEP, _glibc_mallopt, use_host_memory

BLOCK_FLOATS = 16 * 2**20  # 64 MB: above glibc's largest mmap threshold


def page_faults_of_reallocations(cycles: int = 3) -> int:
    """Minor page faults of allocating, filling and freeing a 64 MB tensor ``cycles`` times after a first one."""
    torch.ones(BLOCK_FLOATS)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(cycles):
        torch.ones(BLOCK_FLOATS)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(_glibc_mallopt() is None, reason="glibc malloc only")
def test_keep_reuses_the_pages_of_a_freed_block_and_default_faults_them_in_again():
    try:
        assert use_host_memory(DEFAULT)
        default_faults = page_faults_of_reallocations()
        assert use_host_memory(KEEP)
        kept_faults = page_faults_of_reallocations()
    finally:
        use_host_memory(KEEP)  # what a CPU training run sets anyway
    assert default_faults >= 3 * 30  # at least a fault per 2 MB huge page per cycle
    assert kept_faults < default_faults / 10


def test_an_unknown_policy_is_refused_by_name():
    with pytest.raises(ValueError, match="host memory policy must be one of .*got 'cache'"):
        use_host_memory("cache")
