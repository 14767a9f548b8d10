#!/usr/bin/env bash
# The GPU benchmarks' jobs, run from the project root on the device machine (`device` tool), one or more per call
# (in turn; `quality+kernels` runs both at once):
#   bash benchmarks/gpu_session.sh quality          # the front's points not screened yet (2k samples each)
#   bash benchmarks/gpu_session.sh peers            # the peers' rows not run yet, two processes (PEER_GROUPS)
#   bash benchmarks/gpu_session.sh ablation         # the ablation's optional rows
#   bash benchmarks/gpu_session.sh measure          # the front's engine pass alone (it times images/s;
#                                                   # FRONT_ARGS="--fp8-kernels fused": issue 17's FP8 kernels,
#                                                   # "fused-cublaslt": their MLPs by cuBLASLt)
#   bash benchmarks/gpu_session.sh profile          # sampling-run profile; DiT-XL/2 steps, FP8 default vs max-autotune
#   bash benchmarks/gpu_session.sh serve            # benchmarks/serve_load.py (issue 19; one call builds and measures;
#                                                   # SERVE_ARGS="--duration-s 6" passes it more options,
#                                                   # "--run-graphs": whole-run CUDA graphs)
#   bash benchmarks/gpu_session.sh kernels          # the Triton GEMMs', Inductor choices' and engines' GPU tests
#   bash benchmarks/gpu_session.sh gemm             # GEMM rates at DiT-XL/2's shapes, the fused FP8 MLP both ways,
#                                                   # the residual add + norm + quantize kernels (norm_rates.py)
#   bash benchmarks/gpu_session.sh fc1              # gemm's rates at fc1's shape alone (gemm-fc1-h200.json)
#   bash benchmarks/gpu_session.sh norm             # gemm's norm kernel rates alone
#   bash benchmarks/gpu_session.sh attention        # DiT-XL/2's attention by each SDPA backend (attention_rates.py)
#   bash benchmarks/gpu_session.sh fp8attention     # its attention in FP8 by cuDNN against the engines' bf16
#                                                   # one + quantize, and the padded GEMMs that would feed it
#                                                   # (fp8_attention.py), then what it costs in FD on the
#                                                   # reference model (fp8_attention_quality.py, 10k samples)
#   bash benchmarks/gpu_session.sh fastaccum        # DiT-XL/2 FP8 step profiles with fast accumulation (and
#                                                   # coordinate-descent tuning, qandc's norm kernel)
#   bash benchmarks/gpu_session.sh fusedstep        # the fastest FP8 step profiled again, its MLP by Triton and
#                                                   # by cuBLASLt (nvmath-python)
#   bash benchmarks/gpu_session.sh launchers        # that step without CUDA graphs: each kernel's launching op
#   bash benchmarks/gpu_session.sh rungraphs        # whole-run graphs against step-by-step engines (run_graph_check.py)
#   bash benchmarks/gpu_session.sh localize         # where those engines read memory they did not write (16 rows)
#   bash benchmarks/gpu_session.sh fullstep         # issue 17's one-run comparison: that step, the floor, the peers
#                                                   # (qandc bench; FULLSTEP="bf16-compiled-50 peers": the rest)
# Carry `.gpu-bundle` (../shared/tools/gpu-bundle --peers, with EXTRA_WHEELS="fastapi starlette uvicorn h11
# prometheus_client httpx httpcore anyio sniffio click opentelemetry-api annotated-doc typing_extensions uvloop
# httptools nvmath-python nvidia-cudnn-frontend==1.16.0" for serve, cuBLASLt's FP8 GELU epilogue and cuDNN's FP8
# attention: fastapi 0.165 imports opentelemetry-api and annotated-doc, the torch machine's typing_extensions lacks
# what anyio 4.16 imports, uvicorn runs on uvloop and httptools where it finds them; the machine has nvmath's
# cuda-bindings; cudnn-frontend 1.16 has no dependencies, later ones pull CUTLASS's DSL) and `.gpu-states/NAME.tgz`
# of earlier calls of this session. Each job's state comes back as $OUT/NAME.tgz (copy it to .gpu-states/), results
# written on the machine as $OUT/results.tgz. A state missing its rows starts from the committed JSON (--seed-from:
# the machine and a new checkout keep nothing between sessions). Every job stops itself before the device's 10-minute
# limit.
set -u
cd "$(dirname "$0")/.."
: "${OUT:?run on the device machine: \$OUT is where results come back}"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu-bundle/whl/*.whl 2>&1 |
  grep -iv warning | tail -2
export PYTHONPATH=/tmp/site:$PWD
# peers runs two processes on one GPU and a+b jobs share it; front_peers alone has held 112 GB at 2k rows a batch
# (its hooks' caches), and ran out of memory beside the ablation at 2500 rows a batch (1000 here): segments that grow
# fragment less
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
# the fullstep job's autotune timings as last committed for each card (a new checkout has no .gpu-states; Inductor
# keys the GEMM timings by the device's name), then this session's; a warm machine keeps what an earlier call of the
# session wrote there when it is newer (session 37: the committed timings replaced the three GEMM shapes call 2 had
# just autotuned)
unpack() { tar xzf "$1" -C /tmp --keep-newer-files --warning=no-ignore-newer; }
for t in benchmarks/results/fullstep-autotune-timings-*.tgz; do unpack "$t"; done
for t in .gpu-states/*.tgz; do [ -f "$t" ] && unpack "$t"; done
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
touch /tmp/gpu-session-start
# a job's time limit, cut to what is left of the call (CALL_S, 570 s: the device stops a command at 600) so that
# the results below are always packed
upto() { local left=$(( ${CALL_S:-570} - SECONDS )); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }
# `limited N command...`: the command interrupted at its limit (N s or what is left of the call), killed if it still
# runs 15 s later (session 37's bench printed its interrupt and had not exited 40 s later, when the device stopped
# the call before its state was packed)
limited() { local s; s=$(upto "$1"); shift; timeout -k 15 -s INT "$s" "$@"; }
save() { tar czf "$OUT/$1.tgz" -C /tmp "qandc-$1" && echo "saved $1: $(du -h "$OUT/$1.tgz" | cut -f1)"; }
R=benchmarks/results

quality() {  # the front's points not screened yet (a changed plan search re-screens its points)
  (cd benchmarks && limited 560 python3 front.py --samplers ddpm ddim --phases screen --budget-s 480 \
     --state /tmp/qandc-front --seed-from results/front-h200.json > "$OUT/front.log" 2>&1)
  save front
}

peers() {  # the peers' rows not run yet, in processes of their own states (rows merge: one file a row)
  (cd benchmarks
   for group in ${PEER_GROUPS:-SeaCache FasterCache,PyramidAttentionBroadcast}; do  # methods of a process: a,b
     (name=front-peers-${group%%,*}
      limited 545 python3 front_peers.py --methods none ${group//,/ } --state /tmp/qandc-$name \
        --budget-s 380 --seed-from results/front-peers-h200.json --out /tmp/$name.json > "$OUT/$name.log" 2>&1
      save $name) &
   done
   wait)
}

ablation() {  # the ablation's optional rows (the issue's 16 are committed)
  (cd benchmarks && limited 545 python3 ablation.py --state /tmp/qandc-ablation --batch-size 1000 \
     --budget-s 420 --seed-from results/ablation.json --out "$OUT/ablation.json" > "$OUT/ablation.log" 2>&1)
  save ablation
}

measure() {
  (cd benchmarks && limited 560 python3 front.py --phases measure --state /tmp/qandc-front \
     --seed-from results/front-h200.json --budget-s "${BUDGET:-470}" ${FRONT_ARGS:-} > "$OUT/measure.log" 2>&1)
  save front
}

profile() {  # whole sampling runs of the reference model (host- or GPU-bound: DDPM's default plan runs at 1.75x of a
  # 2.2x bound), then single DiT-XL/2 FP8 steps: the engines as built; the 1152-wide LayerNorm + modulate + quantize
  # kernels (2.3 ms of the 13.2 ms step, looped reductions) as one-pass ones, by Inductor's multi-kernel or by a
  # choices handler; fc1 + GELU + quantize as one Triton kernel (1.75 ms more); and both. Rows resume and the compile
  # cache stays while the machine is warm: call it again until profile.log shows every row (no variant starts after
  # 360 s of a call)
  local start=$SECONDS
  limited 140 python3 benchmarks/profile_step.py --model reference --run --plan default-shape \
    --precisions bf16 --state /tmp/qandc-profile/runs > "$OUT/profile.log" 2>&1
  for variant in "" "--persistent-reductions-up-to 2048" "--fused-fp8-mlp" \
                 "--fused-fp8-mlp --persistent-reductions-up-to 2048" "--inductor-config triton.multi_kernel=1"; do
    (( SECONDS - start > 360 )) && break
    limited 200 python3 benchmarks/profile_step.py --model dit-xl-2 --precisions w8a8-fp8 $variant \
      --state /tmp/qandc-profile/steps --seed-from $R/profile-step-h200.json >> "$OUT/profile.log" 2>&1
  done
  save profile
}

fastaccum() {  # FP8 GEMMs without float32 promotion (cuBLASLt's use_fast_accum, the fused kernel's): the plain and
  # the fused-MLP engines, one-pass norms, the fused ones with Inductor's coordinate-descent tuning of its Triton
  # kernels (its norm kernels run at about half the memory's rate), and with qandc's norm kernel instead
  # (~2 minutes a row on a fresh machine; rows resume like profile's)
  for variant in "" "--fused-fp8-mlp" "--fused-fp8-mlp --inductor-config coordinate_descent_tuning=True" \
                 "--fused-fp8-mlp --fused-fp8-norm"; do
    limited 250 python3 benchmarks/profile_step.py --model dit-xl-2 --precisions w8a8-fp8 $variant \
      --persistent-reductions-up-to 2048 --fp8-fast-accum --state /tmp/qandc-profile/steps \
      --seed-from $R/profile-step-h200.json >> "$OUT/profile.log" 2>&1
  done
  save profile
}

fusedstep() {  # the fused MLP + fused norms + fast accumulation, measured anew: the MLP by cuBLASLt's GELU epilogue
  # (nvmath-python, in the bundle; its row under the same key as session 15's, whose norm kernel had chosen one-block
  # rows: `triton_configs` tells them apart), then by the Triton kernel (its TMA one on Hopper); FUSEDSTEP picks other
  # variants, comma-separated, each --fp8-mlp-kernel's value and more options
  local variants
  IFS=, read -ra variants <<< "${FUSEDSTEP:-auto --remeasure,triton --remeasure}"
  for kernel in "${variants[@]}"; do
    limited 250 python3 benchmarks/profile_step.py --model dit-xl-2 --precisions w8a8-fp8 --fused-fp8-mlp \
      --fused-fp8-norm --persistent-reductions-up-to 2048 --fp8-fast-accum --fp8-mlp-kernel $kernel \
      --state /tmp/qandc-profile/steps --seed-from $R/profile-step-h200.json >> "$OUT/profile.log" 2>&1
  done
  save profile
}

rungraphs() {  # whole-run graphs against the step-by-step engines, batch by batch, on the serve benchmark's engines
  # (benchmarks/run_graph_check.py: buckets 4, 8, 12, step noise drawn in parallel and serially; ~2 minutes;
  # RUNGRAPHS: its options)
  limited 300 python3 benchmarks/run_graph_check.py ${RUNGRAPHS:-} > "$OUT/rungraphs.log" 2>&1
}

localize() {  # where the serve engines read memory they did not write, at 16 rows (run_graph_check.py --localize:
  # each input beside NaN, the programs eagerly over NaN memory, the INT8 GEMM alone; ~1 minute; LOCALIZE: more
  # options, e.g. --no-cudnn-attention)
  limited 200 python3 benchmarks/run_graph_check.py --localize 16 ${LOCALIZE:-} \
    > "$OUT/localize.log" 2>&1
}

launchers() {  # the fastest FP8 step without CUDA graphs, so that the profiler links each kernel to the op that
  # launched it (where the step's memsets come from); its results apart, under $OUT/launchers (committed as
  # profile-step-launchers-<card>.*)
  limited 250 python3 benchmarks/profile_step.py --model dit-xl-2 --precisions w8a8-fp8 --fused-fp8-mlp \
    --fused-fp8-norm --persistent-reductions-up-to 2048 --fp8-fast-accum --no-cuda-graphs \
    --state /tmp/qandc-profile/launchers --results "$OUT/launchers" > "$OUT/launchers.log" 2>&1
}

fullstep() {  # DiT-XL/2 only: qandc's fastest FP8 engines, the floor and the peers into bench-h200-fullstep.json.
  # The peers' max-autotune compiles take ~10 minutes on a fresh machine, more than a call: stages resume from the
  # state on the same (warm) machine. A new machine is a new sitting, and the bench compares its fastest row with the
  # peers of that row's sitting only: leave fullstep.tgz out of .gpu-states (its rows would count as done there).
  # FULLSTEP (the stages, run in that order) defaults to that row beside the two fastest peers seen so far; a second
  # call adds the rest (and bf16 engines). Inductor's autotune results come back as fullstep-timings.tgz (~80 kB;
  # carried in .gpu-states within a session and committed as $R/fullstep-autotune-timings-<card>.tgz, which every call
  # unpacks first: a fresh machine reads them instead of timing every choice again: in session 17 that took
  # 123 s for the bf16 peer's GEMM shapes and 272 s for the FP8 peer's, 45-76 s an FP8 shape of 106 choices; the
  # peers' rows then say their cache was not empty). FULLSTEP_CARD names the results' file (bench-<card>.json;
  # default h200-fullstep): a sitting of other rows alone writes its own
  limited 560 python3 -m qandc bench --models dit-xl-2 --card ${FULLSTEP_CARD:-h200-fullstep} --state /tmp/qandc-fullstep \
    --work /tmp/fullstep-work --budget-s 400 \
    --only ${FULLSTEP:-fp8-fused-only fp8-floor peer-torchao-fp8-tensor peer-compile-bf16} > "$OUT/fullstep.log" 2>&1
  echo "qandc bench exit status $?" >> "$OUT/fullstep.log"
  save fullstep
  # with the GEMM choices' timings (cache/), each Triton kernel's tuned config (*.best_config beside its source: the
  # coordinate-descent search torchao turns on, max-autotune's pointwise configs), which a new process would redo
  (cd /tmp && { echo fullstep-work/inductor/cache; find fullstep-work/inductor -name '*.best_config'; } |
     tar czf "$OUT/fullstep-timings.tgz" -T -) && echo "kept the autotune timings" \
    "(commit them as $R/fullstep-autotune-timings-<card>.tgz)"
}

kernels() {  # the GPU tests of the Triton GEMMs and the Inductor engines, CUDA graphs of steps and of whole runs
  # included (the CPU CI has no GPU and no Triton); KERNELS_K="cublaslt or whole_run" picks some (pytest -k);
  # FXKEYS=1: the FX graph cache keys part by part of every process the tests start, in turn (kernels.fxkeys; each
  # line names its process), to tell what differs where a fresh process misses the build's compilations
  local codecache=/tmp/kernels-codecache.log
  rm -f $codecache
  limited 540 env ${FXKEYS:+TORCH_LOGS=+torch._inductor.codecache TORCH_LOGS_OUT=$codecache} \
    python3 -m pytest -q -p no:cacheprovider -rfE ${FXKEYS:+--show-capture=no} tests/test_triton_kernels.py \
    tests/test_profile_step.py tests/test_inductor.py tests/test_forecast_engines.py ${KERNELS_K:+-k "$KERNELS_K"} \
    > "$OUT/kernels.log" 2>&1
  [ -f $codecache ] && fxkeys $codecache > "$OUT/kernels.fxkeys"
}

fxkeys() {  # a TORCH_LOGS=+torch._inductor.codecache log's FX graph cache keys with every line of their parts (the
  # graph's code, the inputs' TensorMetadata), each line led by its process id
  awk '/hash details for key/ { match($0, /codecache\.py:[0-9]+\]/); site = substr($0, RSTART, RLENGTH) }
       site != "" && index($0, site)' "$1" | sed -E 's/^[A-Z][0-9]{4} [0-9:.]+ ([0-9]+) [^]]*\] /\1 /' | cut -c1-600
}

gemm() {  # ~2 minutes on a fresh machine (the fused kernel's autotuning and tile sweep, both accumulations), then
  # the residual add + norm + quantize kernels (~1 minute)
  limited 300 python3 benchmarks/gemm_rates.py --out $R/gemm-h200.json > "$OUT/gemm.log" 2>&1
  limited 150 python3 benchmarks/norm_rates.py --out $R/norm-h200.json > "$OUT/norm.log" 2>&1
}

fc1() {  # fc1's GEMM rates alone, the MLP's middle every way (Triton's fused kernels, cuBLASLt's GELU epilogue by
  # its heuristic's algorithm and autotuned), into gemm-fc1-h200.json (~80 s)
  limited 300 python3 benchmarks/gemm_rates.py --shapes fc1 --out $R/gemm-fc1-h200.json \
    > "$OUT/gemm.log" 2>&1
}

norm() {  # gemm's norm kernel rates alone (~1 minute)
  limited 150 python3 benchmarks/norm_rates.py --out $R/norm-h200.json > "$OUT/norm.log" 2>&1
}

attention() {  # DiT-XL/2's attention by each SDPA backend, heads as they are and padded (~30 s)
  limited 120 python3 benchmarks/attention_rates.py --out $R/attention-h200.json > "$OUT/attention.log" 2>&1
}

fp8attention() {  # cuDNN's FP8 attention at DiT-XL/2's shapes (cudnn-frontend 1.16 from the bundle; ~1 minute),
  # then the reference model's FD with it simulated (a W8A8-FP8 recipe calibrated first; three rows of 10k samples)
  limited 200 python3 benchmarks/fp8_attention.py --out $R/fp8-attention-h200.json \
    > "$OUT/fp8attention.log" 2>&1
  (cd benchmarks && limited 400 python3 fp8_attention_quality.py \
     --out results/fp8-attention-quality-h200.json >> "$OUT/fp8attention.log" 2>&1)
}

serve() {  # a fresh machine builds the engines (200-240 s for the 8 row counts of 7 buckets; 12 of 10 buckets since
  # the midpoints: more), then measures a --max-batch if the build ended within SERVE_BUDGET s (330): the server (its
  # warm-up 90-170 s for 7 buckets, the load points ~50), then the offline readings and the engine process alone
  # (~40-70 s each); phases cut by the call's limit resume on a warm machine: fire the next call at once (the
  # device gives a machine back after 30 s idle)
  # FXKEYS=1: Inductor's FX graph cache keys, part by part (TORCH_LOGS), of the build's compilations (serve.fxkeys)
  # and the server's (server-*.fxkeys in the state), to tell what differs where a fresh server misses the cache
  # the build filled (session 17: every warm-up compilation missed, 200 s; on a warm machine they hit, 56 s); the
  # inputs' TensorMetadata kept (session 18: every input's hash differed, the graphs' did not; session 20 found why:
  # the build's process pickled memory formats through __mp_main__, the server's through torch._utils --
  # inductor_backend.stable_cache_keys)
  limited 560 env ${FXKEYS:+TORCH_LOGS=+torch._inductor.codecache} python3 benchmarks/serve_load.py \
    --state /tmp/qandc-serve-load/state --work /tmp/qandc-serve-load/work --budget-s ${SERVE_BUDGET:-330} \
    ${SERVE_ARGS:-} > "$OUT/serve.log" 2>&1
  if [ -n "${FXKEYS:-}" ]; then
    for log in "$OUT/serve.log" /tmp/qandc-serve-load/state/server-*.log; do
      [ -f "$log" ] || continue
      fxkeys "$log" > "${log%.log}.fxkeys"
      grep -v 'codecache.py' "$log" > "$log.short" && mv "$log.short" "$log"
    done
  fi
  tar czf "$OUT/serve-load.tgz" -C /tmp qandc-serve-load/state  # the built engines (55 MB packed) cannot come back
}

for job in "$@"; do  # a+b: jobs side by side (quality-only ones: a timed job wants the GPU alone)
  IFS=+ read -ra side <<< "$job"
  for part in "${side[@]}"; do "$part" & done
  wait
done
find $R -newer /tmp/gpu-session-start -type f | tar czf "$OUT/results.tgz" -T -
tail -n 5 "$OUT"/*.log
