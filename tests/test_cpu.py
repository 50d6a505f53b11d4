import os
import statistics
import subprocess
import sys

import pytest
import torch

from bayesprune import FitConfig, GateConfig, fit, gate
from bayesprune.core.cpu import eager_attention
from tests.conftest import VOCAB, tiny_model

PROBE = """
import resource, torch
from bayesprune.core.cpu import hold_freed_memory
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


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_eager_attention_on_a_cpu_gives_the_same_logits_and_puts_the_implementation_back(family):
    gated = gate(tiny_model(family), GateConfig(units=("attn", "neuron") if family == "gpt2" else ("head", "neuron")))
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    implementation = gated.model.config._attn_implementation
    assert implementation != "eager"
    gates = {k: torch.rand(gated.values.shape(k), generator=torch.Generator().manual_seed(1)) for k in gated.kinds}
    with torch.no_grad(), gated.gates_set(gates):
        expected = gated(input_ids=ids).logits
        with eager_attention(gated.model):
            assert gated.model.config._attn_implementation == "eager"
            eager = gated(input_ids=ids).logits
    assert gated.model.config._attn_implementation == implementation
    torch.testing.assert_close(eager, expected, atol=1e-5, rtol=1e-5)
    fit(gated, ids, FitConfig(steps=1, critical_nll=0.0), progress=False)
    assert gated.model.config._attn_implementation == implementation
