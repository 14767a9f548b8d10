"""The full-step peers of `qandc bench` compute the step qandc's model computes, on the same inputs (tiny DiT on the
CPU, eager); their timing needs a GPU, and a peer that cannot run is a row saying why."""

import importlib.util

import pytest
import torch

from qandc.step_peers import PEERS, measure_peer, peer, peer_module, step_inputs

from conftest import rel_err, tiny_model


def _peer_output(name, model):
    module, step = peer_module(peer(f"peer-{name}"), model, "cpu")
    x, t, y = step_inputs(model, 4, "cpu")
    with torch.no_grad():
        return step(module, x, t, y).float(), model(x.float(), t, y)


def test_the_bf16_module_peer_is_the_model_in_bf16():
    out, reference = _peer_output("compile-bf16", tiny_model())
    assert rel_err(out, reference) < 2e-2


def test_the_diffusers_peer_computes_the_same_step():
    pytest.importorskip("diffusers")
    out, reference = _peer_output("diffusers-compile", tiny_model(hidden_size=64))
    assert out.shape == reference.shape and rel_err(out, reference) < 3e-2


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed")
def test_the_torchao_int8_peer_quantizes_the_block_linears_only():
    model = tiny_model(hidden_size=64)
    module, _ = peer_module(peer("peer-torchao-int8"), model, "cpu")
    kinds = {n: type(m.weight).__name__ for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
    assert all((kind != "Parameter") == n.startswith("blocks.") for n, kind in kinds.items()), kinds
    out, reference = _peer_output("torchao-int8", model)
    assert rel_err(out, reference) < 0.1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the GPU-less path")
def test_a_peer_without_a_gpu_is_a_row_saying_so():
    rows = [measure_peer(p, tiny_model(), 4) for p in PEERS]
    assert [r["name"] for r in rows] == [p.name for p in PEERS]
    assert all(r["skipped"] == "needs a CUDA GPU" and "ms_full_step" not in r for r in rows)


def test_settings_a_peer_changes_do_not_outlive_it():
    from qandc.step_peers import kept_settings

    precision, tuning = torch.get_float32_matmul_precision(), torch._inductor.config.coordinate_descent_tuning
    with kept_settings():  # what torchao's set_inductor_config does
        torch.set_float32_matmul_precision("medium" if precision != "medium" else "high")
        torch._inductor.config.coordinate_descent_tuning = not tuning
    assert torch.get_float32_matmul_precision() == precision
    assert torch._inductor.config.coordinate_descent_tuning == tuning


def test_a_compile_report_counts_graphs_breaks_cache_hits_and_cudagraph_skips():
    from torch._inductor.cudagraph_utils import log_cudagraph_skip_and_bump_counter

    from qandc.step_peers import compile_report, compile_summary

    def step(x):
        x = x * 2
        torch._dynamo.graph_break()
        return x + 1

    with compile_report() as report:
        compiled = torch.compile(step)
        compiled(torch.ones(3))
        compiled(torch.ones(3))  # runs the graphs already compiled: nothing new
        log_cudagraph_skip_and_bump_counter("skipping cudagraphs due to cpu device (x)")  # as Inductor logs one
    assert report["graphs"] == 2 and sum(report["graph_breaks"].values()) == 1
    assert report["fx_graph_cache"]["hit"] + report["fx_graph_cache"]["miss"] == 2  # a hit where an earlier run left it
    assert report["cudagraph_skips"] == 1
    assert report["cudagraph_skip_reasons"] == ["skipping cudagraphs due to cpu device (x)"]
    assert "2 graph(s), 1 break(s), FX graph cache: " in compile_summary(report)
    assert compile_summary(report).endswith("1 without CUDA graphs (skipping cudagraphs due to cpu device (x))")
    torch.compiler.reset()
    with compile_report() as again:
        torch.compile(step)(torch.ones(3))
    assert again["graphs"] == 2 and again["fx_graph_cache"] == {"hit": 2, "miss": 0, "bypass": 0}
    assert again["cudagraph_skips"] == 0 and again["cudagraph_skip_reasons"] == []


def test_compile_phases_are_those_of_the_compiles_inside_and_printed_when_interrupted(capsys):
    from qandc.step_peers import compile_phases

    def step(x):
        return torch.nn.functional.gelu(x) * 3

    with compile_phases() as phases:
        torch.compile(step)(torch.ones(4))
    assert phases["_compile.compile_inner"]["calls"] == 1 and phases["_compile.compile_inner"]["s"] >= 0
    assert len(phases) <= 12 and list(phases.values()) == sorted(phases.values(), key=lambda p: -p["s"])
    with compile_phases() as nothing:
        torch.compile(step)(torch.ones(4))  # compiled already: no phase runs
    assert nothing == {}
    torch.compiler.reset()
    with pytest.raises(KeyboardInterrupt), compile_phases(top=3) as cut:
        torch.compile(step)(torch.ones(4))
        raise KeyboardInterrupt  # as the device call's limit stops a compile
    assert len(cut) == 3 and cut["_compile.compile_inner"]["calls"] == 1
    printed = capsys.readouterr().out
    assert printed.startswith("stopped inside a compile; its finished phases: _compile.compile_inner ")
