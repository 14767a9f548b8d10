"""Inductor's compile-cache keys of qandc's engines do not depend on what the main script imports (the bug a fresh
`qandc serve` hit: every graph the build compiled missed; `stable_cache_keys`). Checked here without compiling: the
key's pickled example input, in processes whose main scripts differ the way the serve benchmark's and the server's
did; the GPU test in test_inductor.py loads real engines in such a process and counts the cache's hits. And an
engine set's compilations are its own (compiled on the CPU, a few seconds)."""

import pytest

from conftest import python_json

KEY = """
import json
from torch._inductor.codecache import FxGraphCachePickler
from torch._subclasses.fake_tensor import FakeTensorMode
from qandc.engines.inductor_backend import stable_cache_keys
with FakeTensorMode():
    example = torch.empty(2, 3)
graph = torch.fx.symbolic_trace(torch.nn.Identity())
with stable_cache_keys():  # a compilation makes its pickler inside the block (InductorEngine.infer)
    inside = FxGraphCachePickler(graph).get_hash(example)
print(json.dumps([inside, FxGraphCachePickler(graph).get_hash(example)]))
"""
# multiprocessing imported first registers __mp_main__ (= __main__) before torch's modules: pickle then reaches
# torch.contiguous_format through this script's `torch`; in the other the first module holding torch is torch's own
MAIN_SCRIPTS = {"holding torch after multiprocessing": "import multiprocessing\nimport torch\n",
                "plain": "import torch\n"}


@pytest.fixture(scope="module")
def keys():
    return {name: python_json(head + KEY, {}) for name, head in MAIN_SCRIPTS.items()}


def test_engine_compile_cache_keys_do_not_depend_on_the_main_script(keys):
    (one, _), (other, _) = keys.values()
    assert one == other


def test_outside_the_block_the_keys_differ_as_the_server_saw(keys):
    """What the block is for, on this torch (if torch fixes its keys, this one says the block can go)."""
    (_, one), (_, other) = keys.values()
    assert one != other


NAMESPACES = """
import json
import torch
from torch._dynamo.utils import counters
from qandc.engines.inductor_backend import one_pass_reductions

def step(x):
    return torch.nn.functional.layer_norm(x, (64,)) * 2

answers = []
for namespace in ("a", "a", "b"):  # torch.compiler.reset: each a new engine of the same graph, as a second build
    torch.compiler.reset()
    before = dict(counters["inductor"])
    with one_pass_reductions(namespace):
        torch.compile(step, dynamic=False)(torch.randn(8, 64))
    answers.append([k for k in ("fxgraph_cache_hit", "fxgraph_cache_miss")
                    if counters["inductor"][k] > before.get(k, 0)])
print(json.dumps(answers))
"""


def test_an_engine_sets_compilations_are_its_own(tmp_path):
    """A graph compiled again in its engine set's namespace comes from the compile cache; the same graph in another
    set's namespace is compiled anew, so that the new set's saved compile cache holds it (a build that took it from
    the cache left it out on torch 2.11: a fresh process compiled it again; `_fill_compile_cache`)."""
    answers = python_json(NAMESPACES, {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    assert answers == [["fxgraph_cache_miss"], ["fxgraph_cache_hit"], ["fxgraph_cache_miss"]]
