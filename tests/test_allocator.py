import os
import statistics
import subprocess
import sys

import pytest

PROBE = """
import resource, torch
from bayesprune.core.allocator import hold_freed_memory
held = hold_freed_memory()
faults = []
for _ in range(7):  # 128 MB, freed at once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(32 << 20)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(held, *faults[1:])
"""


def probe(**env) -> tuple[bool, list[int]]:
    environment = {k: v for k, v in os.environ.items()
                   if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "BAYESPRUNE_HOLD"))}
    out = subprocess.run([sys.executable, "-c", PROBE], env=environment | env, check=True, capture_output=True,
                         text=True).stdout.split()
    return out[0] == "True", [int(n) for n in out[1:]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_held_memory_is_reused_without_faulting_it_in_again_unless_the_user_tuned_the_allocator():
    held, faults = probe()  # the kernel may still reclaim an idle block now and then
    assert held and statistics.median(faults) < 1000, faults  # a fresh 128 MB block is 32,768 pages
    held, faults = probe(BAYESPRUNE_HOLD_MEMORY="0")
    assert not held and min(faults) > 30_000, faults
    assert not probe(GLIBC_TUNABLES="glibc.malloc.arena_max=2")[0]
