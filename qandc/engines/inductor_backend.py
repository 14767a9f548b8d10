"""PyTorch Inductor engines: every graph of the cache plan (the full graph and each reuse graph) of a bf16 model (with
the recipe's FP8 / INT8 layers as real kernels, `quantized.py`), each saved as a `torch.export` program (`full.pt2`,
`reuse.pt2`, `reuse1.pt2`, ...; batch dynamic), plus Inductor's portable compile cache (`inductor-cache.bin`) filled
at build time for every graph at the batch sizes asked for, so that loading recompiles from the cache instead of
autotuning again, and the choices qandc's own Triton kernels' autotuning made then (`autotune_choices`), so that a
process loading the engines times none of them again. Cache tensors of plain reuse are bf16 (the "model" dtype),
forecast factors float32 or bf16 as the plan says.

AOTInductor packages would be the natural artifact, but loading one segfaulted on the GPU machine's torch 2.11
(environment.md); an exported program plus its saved compile cache is the reloadable engine instead. A build is
tied to the device type it ran on (the manifest says which). On the CPU no compile cache is written and the
engines run the exported programs as they are (eager), which is what the tests here exercise; compiling and CUDA
graphs need a GPU.
"""

from __future__ import annotations

import contextlib
import copyreg
import functools
import io
import platform
import uuid
from pathlib import Path

import torch

from .. import __version__
from ..artifacts import atomic_path, read_json, write_json
from ..errors import QandcError
from ..formats.manifest import EngineManifest, pipeline_fields
from ..locking import holds_output
from ..model.graphs import GraphSpec, PathGraph, example_feeds
from ..readers import open_regular, refuse_zip_bomb, regular_file
from ..staging import check_apart, staged_folder
from . import autotune_choices
from . import quantized as quantized_module  # also registers qandc::int8_linear, which the programs call
from .backend import Backend, BuildResult, Capabilities, check_engine_inputs

SUFFIX = ".pt2"
CACHE = "inductor-cache.bin"
# bf16 engines autotune their GEMMs (the strongest baseline); quantized ones call cuBLASLt FP8 / the Triton INT8
# kernel (which autotunes itself), so Inductor's default mode suffices and compiles in a fraction of the time.
# CUDA graphs are the runtime's, per batch size.
COMPILE_MODES = {False: "max-autotune-no-cudagraphs", True: "default"}
MAX_BATCH_SIZES = 64  # batch sizes one engine may be compiled for in a process


def fx_graph_cache_answers(before: dict) -> dict:
    """Inductor's compilations since `before` (a copy of torch._dynamo's counters["inductor"]) by how its FX graph
    cache answered them: hit, miss, bypass."""
    from torch._dynamo.utils import counters

    return {answer: counters["inductor"][f"fxgraph_cache_{answer}"] - before.get(f"fxgraph_cache_{answer}", 0)
            for answer in ("hit", "miss", "bypass")}


def build_files(model, out_dir: Path, graphs: dict[str, GraphSpec], batch_sizes) -> BuildResult:
    """Export every graph of `model` (already in its inference dtype and quantized form, on its device) and, on a
    GPU, compile them for `batch_sizes` rows and save the compile cache."""
    feeds = example_feeds(model, graphs)
    batch = torch.export.Dim("batch", min=1, max=4096)
    engines = {}
    for name, spec in graphs.items():
        args = tuple(feeds[name][n] for n in spec.input_names)
        try:
            shapes = [tuple({0: batch} for _ in args)]  # one entry: PathGraph takes its inputs as *inputs
            program = torch.export.export(PathGraph(model, spec), args, dynamic_shapes=shapes)
        except Exception as e:  # torch.export reports untraceable code in many exception types
            raise QandcError(f"torch.export could not trace the {name} path: {str(e).splitlines()[0][:300]}") from e
        buffer = io.BytesIO()  # torch.export.save wants a .pt2 name or a buffer; the temporary file has neither
        torch.export.save(program, buffer)
        with atomic_path(out_dir / f"{name}{SUFFIX}") as tmp:
            tmp.write_bytes(buffer.getvalue())
        engines[name] = f"{name}{SUFFIX}"
    cuda = model.device.type == "cuda"
    namespace = uuid.uuid4().hex if cuda else None
    if cuda:
        _fill_compile_cache(model, out_dir, engines, graphs, batch_sizes, namespace)
    record = {"device": model.device.type, "compiled_batch_sizes": list(batch_sizes) if cuda else [],
              "one_pass_reductions_up_to": ONE_PASS_REDUCTIONS_UP_TO if cuda else None,
              "compile_cache_namespace": namespace,
              "compile_cache": CACHE if cuda else None,
              "autotune_choices": autotune_choices.FILE if cuda else None}
    return BuildResult(engines, [*engines.values(), *([CACHE, autotune_choices.FILE] if cuda else [])], record)


def _fill_compile_cache(model, out_dir: Path, engines: dict, graphs: dict[str, GraphSpec], batch_sizes,
                        namespace: str) -> None:
    """Compile every graph at every batch size under the engine set's own cache `namespace` and save what was
    compiled. In a namespace no earlier build used, every compilation is compiled here, not taken from a cache: on
    torch 2.11 (H200, session 24) a graph the process had compiled before for other engines -- the reuse graph,
    the same in a model's INT8 and FP8 engines -- came from the cache and was missing from the saved artifacts, so a
    fresh process loading those engines compiled it again."""
    torch.compiler.reset()
    quantized = any(isinstance(m, quantized_module.QuantLinear) for m in model.modules())
    loaded = {g: InductorEngine(out_dir / file, graphs[g], True, quantized, namespace)
              for g, file in engines.items()}
    for rows in batch_sizes:
        feeds = example_feeds(model, graphs, rows)  # cache inputs of the engines' dtype and shapes
        for name, engine in loaded.items():
            engine.infer(feeds[name])
    blob, _ = torch.compiler.save_cache_artifacts()
    with atomic_path(out_dir / CACHE) as tmp:
        tmp.write_bytes(blob)
    write_json(out_dir / autotune_choices.FILE, autotune_choices.chosen())  # qandc's Triton kernels', at these shapes


def _memory_format(name: str) -> torch.memory_format:
    return getattr(torch, name)


def _reduce_memory_format(memory_format: torch.memory_format):
    return _memory_format, (str(memory_format).removeprefix("torch."),)


@contextlib.contextmanager
def stable_cache_keys():
    """Inductor's compile-cache keys the same in every process. A key pickles each input's memory format, which
    names no module of its own, so pickle names the first module in `sys.modules` it can reach it through: that is
    `__mp_main__` (= `__main__`, registered by an early `import multiprocessing`) when the main script holds `torch`,
    else `torch._utils` — a server or script loading the engines then missed every graph the build compiled (torch
    2.11, H200, session 20: the serve benchmark's build against `qandc serve`, 0 hits a warm-up batch). Within the
    block memory formats pickle through a function of this module, whatever the main script imports."""
    previous = copyreg.dispatch_table.get(torch.memory_format)
    copyreg.dispatch_table[torch.memory_format] = _reduce_memory_format
    try:
        yield
    finally:
        if previous is None:
            del copyreg.dispatch_table[torch.memory_format]
        else:
            copyreg.dispatch_table[torch.memory_format] = previous


ONE_PASS_REDUCTIONS_UP_TO = 2048


class _OnePassReductions:
    """Inductor's choices handler while an engine compiles: reductions of up to `ONE_PASS_REDUCTIONS_UP_TO`
    elements as one-pass (persistent) Triton kernels, whatever their hint; everything else as `prior` decides."""

    def __init__(self, prior):
        self.prior = prior

    def should_use_persistent_reduction(self, features, cooperative_reduction: bool) -> bool:
        from torch._inductor.virtualized import V

        if (torch._inductor.config.triton.persistent_reductions and not cooperative_reduction
                and V.graph.sizevars.statically_known_leq(features.reduction_numel, ONE_PASS_REDUCTIONS_UP_TO)):
            return True
        return self.prior.should_use_persistent_reduction(features, cooperative_reduction)

    def __getattr__(self, name):
        return getattr(self.prior, name)


@functools.cache  # one pass a namespace: an engine enters the block at every call
def _in_cache_key(namespace: str):
    """A post-grad pass that changes nothing but Inductor's cache keys: graphs compiled under `one_pass_reductions`
    never come back from a cache filled without it (or from engines built before it), nor from another `namespace`."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class OnePassReductionsKey(CustomGraphPass):
        def __call__(self, graph) -> None:
            return None

        def uuid(self) -> str:
            key = f"qandc one-pass reductions up to {ONE_PASS_REDUCTIONS_UP_TO}"
            return f"{key}; engine set {namespace}" if namespace else key

    return OnePassReductionsKey()


@contextlib.contextmanager
def one_pass_reductions(namespace: str = ""):
    """Compilations within the block make row reductions of up to `ONE_PASS_REDUCTIONS_UP_TO` elements one-pass
    Triton kernels. A looped reduction kernel that stores a tensor in its first loop may read it back in its second
    (the last kernel of a forecasting full graph stores the cached trunk, then reads it for the forecast's
    difference); Triton can give the store and the read to different threads with no barrier between them, so the
    read may see the memory as it was (Inductor in torch 2.11 and 2.13 puts none there; pytorch#190517). Session 23
    (H200, torch 2.11) met it in the reference model's INT8 full graph at 16 rows: its cached outputs changed with
    whatever the caching allocator's memory held (NaN there: NaN trunks, samples non-finite from the next reuse
    step), while the same program run eagerly did not (`benchmarks/run_graph_check.py --localize`). A one-pass
    kernel keeps the stored tensor in registers and reads nothing back. Cache keys carry the setting and
    `namespace` (an engine set's own, `_fill_compile_cache`). GPU test:
    `test_a_forecasting_full_graph_reads_no_memory_it_did_not_write`."""
    from torch._inductor.virtualized import V

    with V.set_choices_handler(_OnePassReductions(V.choices)), \
            torch._inductor.config.patch(post_grad_custom_post_pass=_in_cache_key(namespace)):
        yield


class InductorEngine:
    """One exported graph: `infer(feeds)` with tensors by input name, returns tensors by output name, on the
    engine's device. `compile=True` runs it through torch.compile (Inductor), its compile-cache keys in the engine
    set's `cache_namespace`; False runs the program eagerly."""

    def __init__(self, path: Path, spec: GraphSpec, compile: bool = True, quantized: bool = False,
                 cache_namespace: str = ""):
        refuse_zip_bomb(regular_file(path), "torch.export program")
        try:
            program = torch.export.load(str(path))
            self.module = program.module()
        except Exception as e:  # a foreign or damaged program: torch raises many types here
            raise QandcError(f"{path}: not a torch.export program this torch can load ({str(e)[:200]})") from None
        traced = {n.name: n.meta["val"] for n in program.graph.nodes if n.op == "placeholder"}
        inputs = program.graph_signature.user_inputs
        if len(inputs) != len(spec.input_names):
            raise QandcError(f"{path}: a program of {len(inputs)} inputs, the {spec.name} graph declares "
                             f"{len(spec.input_names)}")
        self.input_names, self.output_names = spec.input_names, spec.output_names
        self.input_dtypes = {name: traced[n].dtype for name, n in zip(spec.input_names, inputs)}
        self.device = next(iter([*self.module.parameters(), *self.module.buffers()])).device
        if self.device.type == "cuda":  # under torchrun: this rank's GPU, not the one the build ran on
            self.device = torch.device("cuda", torch.cuda.current_device())
            self.module.to(self.device)
        self.compiled, self.cache_namespace = compile, cache_namespace
        if compile:  # one compilation per batch size (dynamic=False): a server's buckets pass dynamo's default of 8,
            # after which it would run the program uncompiled, silently
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, MAX_BATCH_SIZES)
        self.fn = torch.compile(self.module, mode=COMPILE_MODES[quantized], dynamic=False) if compile else self.module

    def infer(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        check_engine_inputs(self, feeds)
        compiling = one_pass_reductions(self.cache_namespace) if self.compiled else contextlib.nullcontext()
        with torch.no_grad(), stable_cache_keys(), compiling:  # a call may compile (a new batch size)
            outputs = self.fn(*[feeds[n].to(self.device) for n in self.input_names])
        return dict(zip(self.output_names, outputs))


class InductorBackend(Backend):
    name = "inductor"
    capabilities = Capabilities(devices=("cpu", "cuda"), precisions=("float", "w8a8-int8", "w8a8-fp8"),
                                cuda_graphs=True)

    def versions(self) -> dict[str, str]:
        return {"torch": torch.__version__}

    def build(self, export_dir, export, out, options) -> BuildResult:
        """From the checkpoint the export names (its sha256 checked) and the recipe the export holds."""
        model = export.checkpoint_model(export_dir).to("cuda" if torch.cuda.is_available() else "cpu")
        engine_model = quantized_module.quantize_for_inference(model, export_dir if export.recipe else None)
        return build_files(engine_model, out, export.graphs, options.batch_sizes)

    def load(self, folder, manifest, compile=True):
        if manifest.build["device"] == "cuda" and not torch.cuda.is_available():
            raise QandcError(f"{folder}: Inductor engines built for a GPU; this machine has none")
        cache, choices = (_build_file(folder, manifest, key) for key in ("compile_cache", "autotune_choices"))
        if cache:
            with open_regular(cache) as f:
                torch.compiler.load_cache_artifacts(f.read())  # before anything compiles in this process
        if choices:  # older engines have none
            autotune_choices.restore(read_json(choices))
        compiled = compile and manifest.build["device"] == "cuda"
        namespace = str(manifest.build.get("compile_cache_namespace") or "")  # older engines have none
        return {g: InductorEngine(folder / file, manifest.graphs[g], compiled, manifest.recipe is not None, namespace)
                for g, file in manifest.engines.items()}


def _build_file(folder: Path, manifest, key: str) -> Path | None:
    """The file the build record names under `key` (None where it names none): one of the manifest's checksummed
    files, else refused (a hand-edited record must not point at a file nothing verified)."""
    name = manifest.build.get(key)
    if name and name not in manifest.files:
        raise QandcError(f"{folder}: the build record's {key} {name!r} is not one of the manifest's checksummed files")
    return folder / name if name else None


@holds_output("build-engine")
def build_inductor(model, out: str | Path, plan=None, recipe_dir: str | Path | None = None,
                   sampler=None, batch_sizes=(), checkpoint: str = "", fused_fp8_mlp: bool = False,
                   fp8_fast_accum: bool = False, fused_fp8_norm: bool = False) -> EngineManifest:
    """Inductor engines of a float32 `model` in memory (on the device they are for), without an export: bf16, the
    recipe's layers as FP8 / INT8 kernels (`fused_fp8_mlp`: FP8 MLPs as `quantized.FusedFp8Mlp`; `fused_fp8_norm`:
    blocks with FP8 qkv and fc1 as `quantized.FusedFp8Block`; `fp8_fast_accum`: FP8 GEMMs without float32
    promotion), its plan, sampler settings and VC table; without a recipe, `plan` (default none) and `sampler`
    (SamplerDefaults)."""
    check_apart(out, {"--checkpoint": checkpoint, "--recipe": recipe_dir}, EngineManifest.KIND)
    fields = pipeline_fields(model, plan, recipe_dir, sampler, checkpoint, folder=out)
    engine_model = quantized_module.quantize_for_inference(model, recipe_dir, fused_fp8_mlp=fused_fp8_mlp,
                                                           fp8_fast_accum=fp8_fast_accum, fused_fp8_norm=fused_fp8_norm)
    fused = sum(isinstance(m, quantized_module.FusedFp8Mlp) for m in engine_model.modules())
    fused_blocks = sum(isinstance(m, quantized_module.FusedFp8Block) for m in engine_model.modules())
    for asked, count, what in ((fused_fp8_mlp, fused, "MLP with FP8 fc1 and fc2 to fuse"),
                               (fused_fp8_norm, fused_blocks, "block with FP8 qkv and fc1 whose norms to fuse")):
        if asked and not count:
            raise QandcError(f"{recipe_dir}: no {what} (the recipe's preset or its layers)")
    with staged_folder(out, EngineManifest.KIND) as staging:  # `out` stays as it was until the engines are whole
        result = build_files(engine_model, staging, fields["graphs"], batch_sizes)
        manifest = EngineManifest(**fields, backend=InductorBackend.name, engines=result.engines,
                                  build={**result.record, "fused_fp8_mlps": fused,
                                         "fused_fp8_norm_blocks": fused_blocks, "fp8_fast_accum": fp8_fast_accum},
                                  versions={"qandc": __version__, "python": platform.python_version(),
                                            **InductorBackend().versions()})
        manifest.write(staging, result.files)
    return manifest
