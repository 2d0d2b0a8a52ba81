#!/usr/bin/env bash
# How moeserve and HF transformers scale with CPU cores: benchmarks/bench_cpu.py (moeserve and HF, no vLLM)
# with 2 threads pinned to CPUs 0,1 and with MANY threads on CPUs 0..MANY-1, then benchmarks/profile_cpu.py
# (one prefill and one decode step by op and by oneDNN kernel) at both counts; prints the ratios.
# The GPUs are hidden: everything runs on the CPU. Needs torch, numpy, safetensors, tokenizers, transformers;
# no network.
#
#   bash benchmarks/bench_cpu_scaling.sh [MANY=16] [OUT=/tmp/moeserve-cpu-scaling]
#
# Raw results land in OUT: bench_t2.json, bench_tMANY.json, profile_t2.json, profile_tMANY.json,
# mla_decode.txt (the MLA decode kernel alone, both its paths, at 2 and MANY threads), and with
# VARIANTS=1 decode_variants.txt: the decode step at MANY threads under OpenMP settings that change how its
# threads wait and where they run (passive waiting, threads bound to cores, one thread per physical core
# where SMT siblings share them, one or two cores left to the rest of the process), and probe_threads.json
# (benchmarks/probe_cpu_threads.py: bandwidth, the expert kernel and the small ops around it at 2..MANY threads);
# with RUNTIMES=1 runtimes.txt: moeserve's bench at 2 and MANY threads on jemalloc or glibc's malloc and on Intel
# or GNU OpenMP. moeserve runs on jemalloc and Intel OpenMP where bench_cpu.py finds them
# (moeserve/cpu_runtime.py): on a host without them, point MOESERVE_JEMALLOC and MOESERVE_IOMP at copies.
set -euo pipefail
cd "$(dirname "$0")/.."
MANY=${1:-16}
OUT=${2:-/tmp/moeserve-cpu-scaling}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" CUDA_VISIBLE_DEVICES=""
PROMPTS=${NUM_PROMPTS:-64} OUTPUT_LEN=${OUTPUT_LEN:-128}  # the workload (bench_cpu.py's); smaller for a quick try
lscpu | grep -E "Model name|^CPU\(s\)|NUMA node|Thread\(s\) per core|Core\(s\) per socket|Socket\(s\)"
lscpu -e=CPU,CORE,SOCKET,NODE | tr '\n' ';'; echo  # which CPUs share a core (SMT siblings share its AMX unit)
echo "AMX flags: $(grep -o 'amx_[a-z0-9]*' /proc/cpuinfo | sort -u | tr '\n' ' ')"
python3 -m moeserve.launch.cli check | grep -E "^cpu"  # the kernels, and how many OpenMP runtimes they loaded

# the in-process scripts (profile_cpu.py, bench_cpu_steps.py, bench_cpu_mla_decode.py) run on the libraries the
# moeserve command preloads for a CPU engine, as bench_cpu.py's moeserve process does
PRELOADS=$(python3 -c "import shlex; from moeserve.cpu_runtime import preload_env
print(' '.join(f'{k}={shlex.quote(v)}' for k, v in preload_env().items()))")
echo "preloads: ${PRELOADS:-none}"
run() {  # run THREADS CPUS
    local threads=$1 cpus=$2
    echo "== $threads threads on CPUs $cpus"
    OMP_NUM_THREADS=$threads taskset -c "$cpus" python3 benchmarks/bench_cpu.py --num-prompts "$PROMPTS" \
        --input-len 128 --output-len "$OUTPUT_LEN" --vllm-python /nonexistent --json-out "$OUT/bench_t$threads.json"
    env $PRELOADS OMP_NUM_THREADS=$threads taskset -c "$cpus" python3 benchmarks/profile_cpu.py --threads "$threads" \
        --prompts "$PROMPTS" --input-len 64 --json-out "$OUT/profile_t$threads.json" | grep -E "^== "
}
run 2 0,1
run "$MANY" "0-$((MANY - 1))"
for t in 2 "$MANY"; do  # MLA decode alone, both paths (AMX tiles, AVX-512): does the kernel scale?
    env $PRELOADS taskset -c "0-$((t - 1))" python3 benchmarks/bench_cpu_mla_decode.py --threads "$t" | tee -a "$OUT/mla_decode.txt"
done
if [ "${VARIANTS:-0}" = 1 ]; then
    steps="benchmarks/bench_cpu_steps.py --prompts $PROMPTS --input-len 64 --decode-steps 8 --rounds 2"
    variant() {  # variant NAME THREADS [ENV...]
        local name=$1 threads=$2; shift 2
        echo "$name: $(env $PRELOADS "$@" taskset -c "0-$((MANY - 1))" python3 $steps --threads "$threads" | tail -1)"
    }
    {
        variant default "$MANY"
        variant passive "$MANY" OMP_WAIT_POLICY=PASSIVE
        variant active "$MANY" OMP_WAIT_POLICY=ACTIVE
        variant bound "$MANY" OMP_PROC_BIND=close OMP_PLACES=cores
        # one thread per physical core, where SMT siblings share cores (their AMX unit and L2 too)
        per_core=$(lscpu -p=CPU,CORE | grep -v '^#' | awk -F, -v n="$MANY" '$1 < n && !seen[$2]++ {print $1}' | paste -sd,)
        cores=$(echo "$per_core" | tr ',' '\n' | wc -l)
        if [ "$cores" -lt "$MANY" ]; then
            echo "one thread per core ($cores cores: CPUs $per_core): $(env $PRELOADS taskset -c "$per_core" python3 $steps \
                --threads "$cores" | tail -1)"
        fi
        if [ "$MANY" -gt 3 ]; then
            variant "one core spare" "$((MANY - 1))"
            variant "two cores spare, bound" "$((MANY - 2))" OMP_PROC_BIND=close OMP_PLACES=cores
            variant "half the threads" "$((MANY / 2))"
            variant "half the threads, bound" "$((MANY / 2))" OMP_PROC_BIND=close OMP_PLACES=cores
        fi
    } | tee "$OUT/decode_variants.txt"
    taskset -c "0-$((MANY - 1))" python3 benchmarks/probe_cpu_threads.py --threads "2,4,8,$MANY" \
        --json-out "$OUT/probe_threads.json" | grep threads
fi

if [ "${RUNTIMES:-0}" = 1 ]; then  # moeserve's bench at 2 and MANY threads on each malloc and OpenMP runtime
    # (each line ends with the run's CPU time in user and system mode, minor faults and context switches)
    for cfg in "2 0,1" "$MANY 0-$((MANY - 1))"; do
        set -- $cfg
        for rt in "jemalloc intel" "jemalloc gnu" "system intel"; do
            set -- "$1" "$2" $rt
            echo "$1 threads, $3 malloc, $4 OpenMP: $(OMP_NUM_THREADS=$1 MOESERVE_CPU_ALLOCATOR=$3 MOESERVE_CPU_OPENMP=$4 \
                taskset -c "$2" python3 benchmarks/bench_cpu.py --skip-hf --num-prompts "$PROMPTS" --input-len 128 \
                --output-len "$OUTPUT_LEN" --vllm-python /nonexistent | grep -E "^moeserve " | cut -c1-250)"
        done
    done | tee "$OUT/runtimes.txt"
fi

python3 - "$OUT" "$MANY" <<'PY'
import json, sys
out, many = sys.argv[1], sys.argv[2]
b2, bm = (json.load(open(f"{out}/bench_t{t}.json")) for t in ("2", many))
p2, pm = (json.load(open(f"{out}/profile_t{t}.json")) for t in ("2", many))
tok = lambda r, e: r[e]["output_tokens_per_s"]
print(f"\nbench_cpu.py output tok/s at 2 -> {many} threads:")
for e in ("moeserve", "hf"):
    print(f"  {e:<9} {tok(b2, e):9.1f} -> {tok(bm, e):9.1f}   x{tok(bm, e) / tok(b2, e):.2f}")
for t, r in (("2", b2), (many, bm)):
    print(f"  moeserve / HF at {t} threads: {tok(r, 'moeserve') / tok(r, 'hf'):.2f}x")
print(f"profile_cpu.py step time at 2 -> {many} threads (one prefill step, then decode steps):")
for ph in ("prefill", "decode"):
    a, b = p2["seconds"][ph], pm["seconds"][ph]
    k2, km = (sum(k["ms"] for k in p["onednn"].get(ph, [])) for p in (p2, pm))
    print(f"  {ph:<8} {a * 1e3:8.1f} ms -> {b * 1e3:8.1f} ms   x{a / b:.2f};  oneDNN kernels {k2:.1f} -> {km:.1f} ms"
          f" (x{k2 / km if km else 0:.2f})")
PY
