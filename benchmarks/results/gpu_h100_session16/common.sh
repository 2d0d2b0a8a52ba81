# sourced by the run scripts: wheels, paths, a summary of profile_decode's JSON lines
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1 || echo "wheel install failed"
export PYTHONPATH=$PWD:$PWD/benchmarks:/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
S='import json,sys
for l in sys.stdin:
    d=json.loads(l); c=d.get("ms_per_step_by_class",{})
    print(sys.argv[1], d["batch"], "step %.3f med %.3f busy %.3f launches %.0f err %s | %s" % (d["step_ms"], d["step_ms_median"], d["gpu_busy_ms_per_step"], d["kernels_per_step"], d["fast_path_error"], " ".join("%s=%.3f" % (k.split()[0], v) for k, v in c.items())))'
# prof NAME SIDE_STREAMS [profile_decode args...]: one run, its JSON lines appended to $OUT/prof.jsonl
prof() {
    local name=$1 side=$2; shift 2
    echo "== $(date +%T) $name"
    MOESERVE_SIDE_STREAM=$side timeout 200 python3 benchmarks/profile_decode.py "$@" --json-out /tmp/p.json 2>&1 |
        grep '"batch"' | tee -a "$OUT/prof_lines.jsonl" | python3 -c "$S" "$name"
    python3 -c "import json,sys; d=json.load(open('/tmp/p.json')); d['name']=sys.argv[1]; print(json.dumps(d))" "$name" >> "$OUT/prof.jsonl" 2>/dev/null
}
