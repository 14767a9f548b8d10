"""benchmarks/profile_step.py on the CPU: a tiny DiT's engines run eagerly under the profiler, CPU ops grouped by
self time; the kernel-name grouping is checked on names the GPU profile shows."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import profile_step  # noqa: E402

GPU_NAMES = {  # kernel names of the kinds an H200 profile of the engines holds
    "pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<72, 128, 64, 4>>": "attention",
    "fmha_cutlassF_bf16_aligned_64x64_rf_sm80": "attention",
    "cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x64_4x1x1": "attention",
    "sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x128_warpgroupsize1x1x1": "gemm",
    "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT": "gemm",
    "_int8_gemm_kernel": "gemm",
    "triton_tem_fused_addmm_gelu_0": "gemm",
    "triton_per_fused__to_copy_add_clamp_div_mul_native_layer_norm_3": "norm/modulation",
    "triton_poi_fused__to_copy_clamp_div_gelu_5": "quantize",
    "triton_poi_fused_add_mul_7": "elementwise",
    # seen on the H200 (FP8 engines): Inductor's kernels named after the `_scaled_mm` whose input they quantize
    "nvjet_sm90_qqtst_128x128_128x6_2x1_v_bz_coopA_algo2_bias_TNT": "gemm",
    "triton_poi_fused__scaled_mm__to_copy_clamp_div_gelu_t_view_10": "quantize",
    "triton_red_fused__scaled_mm__to_copy_add_clamp_div_mul_native_layer_norm_split_t_unsqueeze_view_11":
        "norm/modulation",
    "Memcpy DtoD (Device -> Device)": "copies",
    "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda>": "copies",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<bool>>": "other",
}


def test_kernel_names_fall_into_their_groups():
    assert {name: profile_step.group_of(name) for name in GPU_NAMES} == GPU_NAMES


def test_busy_time_is_the_union_of_overlapping_intervals():
    events = [("a", 0.0, 10.0, 10.0), ("b", 5.0, 12.0, 7.0), ("c", 20.0, 21.0, 1.0), ("d", 6.0, 7.0, 1.0)]
    assert profile_step.busy_us(events) == 13.0


def _run(tmp_path, *args):
    out = tmp_path / "results"
    with pytest.MonkeyPatch.context() as patch:  # the script sets Inductor's cache folder: not for later tests
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "work" / "inductor"))
        profile_step.main(["--model", "tiny", "--precisions", "bf16", "--plan", "interval=3", "--work",
                           str(tmp_path / "work"), "--state", str(tmp_path / "state"), "--results", str(out), *args])
    return out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke path")
def test_step_profile_counts_every_linear_once_a_full_step_and_resumes_from_state(tmp_path):
    out = _run(tmp_path, "--rows", "4", "--repeats", "2")
    result = json.loads((out / "profile-step-cpu.json").read_text())
    rows = {r["graph"]: r for r in result["rows"]}
    linears = sum(isinstance(m, torch.nn.Linear) for m in profile_step.make("tiny", "cpu").modules())
    assert rows["full"]["groups"]["gemm"]["kernels"] == linears
    assert rows["full"]["groups"]["attention"]["kernels"] > 0 == rows["reuse"]["groups"]["attention"]["kernels"]
    assert sum(g["share"] for g in rows["full"]["groups"].values()) == pytest.approx(1.0)
    assert all(r["ms_step_back_to_back"] > 0 for r in rows.values())
    assert result["flops_full_step"] > 0 and "fp8_floor_ms" not in result
    assert "(cpu, cpu," in (out / "profile-step-cpu.md").read_text()
    shutil.rmtree(tmp_path / "work")  # a rerun takes the rows from --state: no engines needed
    assert json.loads((_run(tmp_path, "--rows", "4") / "profile-step-cpu.json").read_text()) == result


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke path")
def test_run_profile_times_every_sampler_step(tmp_path):
    out = _run(tmp_path, "--run", "--images", "2", "--steps", "4")
    rows = json.loads((out / "profile-run-cpu-tiny-interval3.json").read_text())["rows"]
    assert [r["sampler"] for r in rows] == ["ddim", "ddpm"]
    assert all(r["engine_calls"] == 4 and r["wall_ms_per_step"] >= r["host_in_engine_ms_per_step"] > 0
               for r in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke path")
def test_a_quantized_mode_is_kept_apart_from_the_engines_own(tmp_path):
    from qandc.engines import inductor_backend

    with pytest.MonkeyPatch.context() as patch:  # main sets the mode for the process: restored after the test
        patch.setitem(inductor_backend.COMPILE_MODES, True, inductor_backend.COMPILE_MODES[True])
        own = json.loads((_run(tmp_path, "--rows", "2", "--repeats", "1", "--precisions", "w8a8-int8")
                          / "profile-step-cpu.json").read_text())
        tried = json.loads((_run(tmp_path, "--rows", "2", "--repeats", "1", "--precisions", "w8a8-int8",
                                 "--quantized-mode", "max-autotune-no-cudagraphs")
                            / "profile-step-cpu.json").read_text())
    assert {r["compile_mode"] for r in own["rows"]} == {"default"}
    assert [r["compile_mode"] for r in tried["rows"]].count("max-autotune-no-cudagraphs") == len(own["rows"])
    assert all(r in tried["rows"] for r in own["rows"])  # the state's other variant beside it, not replaced
    assert len(list((tmp_path / "state").glob("*.json"))) == 2


def test_cupti_wait_records_are_not_work():
    assert profile_step.DEVICE_WAITS.match("Stream Sync") and profile_step.DEVICE_WAITS.match("Event Sync")
    assert not any(profile_step.DEVICE_WAITS.match(name) for name in GPU_NAMES)


def test_annotated_ranges_on_the_gpu_timeline_are_not_work():
    """The script's own ranges and Inductor's around a compiled graph (user annotations), and waits: not work."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def event(name, start, end):
        return SimpleNamespace(name=name, device_type=DeviceType.CUDA,
                               is_user_annotation=name.startswith(("profile_step::", "## ")),
                               time_range=SimpleNamespace(start=start, end=end, elapsed_us=lambda: end - start))

    prof = SimpleNamespace(events=lambda: [event("profile_step::full", 0.0, 100.0),
                                           event("## Call CompiledFxGraph fabc ##", 0.5, 99.0),
                                           event("nvjet_sm90_qqtst_TNT", 1.0, 41.0), event("Stream Sync", 41.0, 90.0),
                                           event("triton_poi_fused_add_0", 50, 52)])
    events = profile_step.work_events(prof, "cuda")
    assert [e[0] for e in events] == ["nvjet_sm90_qqtst_TNT", "triton_poi_fused_add_0"]
    totals = profile_step.grouped(events, per=2)
    assert totals["work_ms"] == pytest.approx(0.021) and totals["groups"]["gemm"]["ms"] == pytest.approx(0.02)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke path")
def test_inductor_settings_are_applied_recorded_and_kept_apart(tmp_path):
    import torch._inductor.config as inductor_config

    with inductor_config.patch({"triton.multi_kernel": inductor_config.triton.multi_kernel}):  # restored after
        plain = json.loads((_run(tmp_path, "--rows", "2", "--repeats", "1") / "profile-step-cpu.json").read_text())
        tried = json.loads((_run(tmp_path, "--rows", "2", "--repeats", "1", "--inductor-config",
                                 "triton.multi_kernel=1") / "profile-step-cpu.json").read_text())
        assert inductor_config.triton.multi_kernel == 1
    assert all(r["inductor_config"] == {} for r in plain["rows"])
    configs = [r["inductor_config"] for r in tried["rows"]]
    assert configs.count({}) == configs.count({"triton.multi_kernel": "1"}) == len(plain["rows"]) == len(configs) / 2
    assert len(list((tmp_path / "state").glob("*.json"))) == 2
    with pytest.raises(SystemExit):
        _run(tmp_path, "--inductor-config", "triton.no_such_setting=1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke path")
def test_fused_fp8_engines_are_profiled_apart_and_run_the_fused_ops(tmp_path):
    result = json.loads((_run(tmp_path, "--rows", "2", "--repeats", "1", "--precisions", "w8a8-fp8",
                              "--fused-fp8-mlp", "--fused-fp8-norm") / "profile-step-cpu.json").read_text())
    assert result["rows"] and all(r["fused_fp8_mlp"] and r["fused_fp8_norm"] for r in result["rows"])
    full = next(r for r in result["rows"] if r["graph"] == "full")  # (the reuse graph reuses every MLP)
    ops = {k["name"] for k in full["kernels"]}
    assert {"qandc::fp8_linear_gelu_quant", "qandc::add_norm_modulate_fp8"} <= ops
    assert any(p.name.endswith("-fusedmlp-fusednorm-engines") for p in (tmp_path / "work").iterdir())
    assert [p.name for p in (tmp_path / "state").glob("*-fusedmlp-fusednorm.json")]


PERSISTENT = """
import sys, torch
sys.path.insert(0, "benchmarks")
import profile_step
from torch._inductor.utils import run_and_get_code
from qandc.engines import inductor_backend
profile_step.persistent_reductions_up_to({limit})
norm = torch.nn.LayerNorm(1152, elementwise_affine=False).cuda()
with inductor_backend.one_pass_reductions():
    _, code = run_and_get_code(torch.compile(norm), torch.randn(64, 1152, device="cuda"))
print("persistent_reduction" in "".join(code))
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Inductor writes Triton kernels for a GPU only")
@pytest.mark.parametrize("limit", [1024, 2048])
def test_rows_of_1152_are_one_pass_kernels_up_to_the_limit_only(limit):
    """In a child process (the limit is the process's): rows of 1152 one-pass at a limit of 2048, looped at 1024."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", PERSISTENT.format(limit=limit)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == str(limit >= 1152)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke path")
def test_a_new_state_takes_the_rows_of_earlier_results_it_lacks(tmp_path):
    from qandc.engines import inductor_backend

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(inductor_backend.COMPILE_MODES, True, inductor_backend.COMPILE_MODES[True])
        _run(tmp_path, "--rows", "2", "--repeats", "1", "--precisions", "w8a8-int8")
        earlier = json.loads((_run(tmp_path, "--rows", "2", "--repeats", "1", "--precisions", "w8a8-int8",
                                   "--quantized-mode", "max-autotune-no-cudagraphs")
                              / "profile-step-cpu.json").read_text())
        seed = tmp_path / "earlier.json"
        seed.write_text(json.dumps(earlier))
        shutil.rmtree(tmp_path / "state")  # a new machine: the state is gone, the committed results are not
        again = json.loads((_run(tmp_path / "fresh", "--rows", "2", "--repeats", "1", "--precisions", "w8a8-int8",
                                 "--seed-from", str(seed)) / "profile-step-cpu.json").read_text())
        other_rows = json.loads((_run(tmp_path / "other", "--rows", "4", "--repeats", "1", "--precisions",
                                      "w8a8-int8", "--seed-from", str(seed)) / "profile-step-cpu.json").read_text())
        remeasured = json.loads((_run(tmp_path / "re", "--rows", "2", "--repeats", "1", "--precisions", "w8a8-int8",
                                      "--quantized-mode", "max-autotune-no-cudagraphs", "--seed-from", str(seed),
                                      "--remeasure") / "profile-step-cpu.json").read_text())
    assert again["rows"] == earlier["rows"]  # no variant measured again: both came from the seed
    by_mode = lambda rows, mode: [r for r in rows if r["compile_mode"] == mode]  # noqa: E731
    mode = "max-autotune-no-cudagraphs"  # --remeasure: this command's variant measured anew, the other seeded
    assert by_mode(remeasured["rows"], mode) != by_mode(earlier["rows"], mode)
    assert by_mode(remeasured["rows"], "default") == by_mode(earlier["rows"], "default")
    assert {r["compile_mode"] for r in again["rows"]} == {"default", "max-autotune-no-cudagraphs"}
    assert len(other_rows["rows"]) == len(earlier["rows"]) // 2  # another row count: its own variant, none seeded


def test_kernels_are_attributed_to_the_ops_that_launched_them():
    """A memset linked to `aten::zero_` of one shape twice in two profiled steps, to one of another shape once and
    once to `qandc::op` (no shapes recorded): 1, 0.5 and 0.5 a step; an op that launched nothing adds nothing, nor
    does the script's own range."""
    from torch.autograd.profiler_util import FunctionEvent

    shapes = [[[8192, 1152], []], [[8192, 1152], []], [[32, 6912]], None, None, None]
    events = [FunctionEvent(i, name, thread=0, start_us=i, end_us=i + 1, input_shapes=shape) for i, (name, shape) in
              enumerate(zip(["aten::zero_", "aten::zero_", "aten::zero_", "qandc::op", "aten::view",
                             "profile_step::full"], shapes))]
    for e in [*events[:4], events[5]]:  # the script's own range: a CUDA graph's replay links its kernels there
        e.append_kernel("Memset (Device)", 0, 1.0)
    events[3].append_kernel("x" * 200, 0, 5.0)
    assert profile_step.launchers(events, per=2) == {
        "Memset (Device)": {"aten::zero_ [8192, 1152]": 1.0, "aten::zero_ [32, 6912]": 0.5, "qandc::op": 0.5},
        "x" * 160: {"qandc::op": 0.5}}


def test_the_autotuned_configs_are_those_the_kernels_chose(monkeypatch):
    """Only kernels that ran (an autotuner with a best config) are reported, each with its config's parameters."""
    pytest.importorskip("triton")
    from qandc.engines import triton_fp8, triton_norm

    chosen = {}
    for name, kernel in (("add_norm_modulate_fp8", triton_norm._add_norm_modulate_fp8_kernel),
                         ("fp8_gemm_gelu_quant", triton_fp8._fp8_gemm_gelu_quant_kernel)):  # (under heuristics)
        config = kernel.configs[len(kernel.configs) // 2]
        monkeypatch.setattr(kernel, "best_config", config, raising=False)
        chosen[name] = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
    assert profile_step.autotuned_configs() == chosen
