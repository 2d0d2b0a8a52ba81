set -uo pipefail
. .scratch/s16_common.sh
V2="--batches 1,64,256"
prof v2-none 0 $V2
prof v2-all "" $V2
prof v2-shared shared $V2
prof v2-none 0 $V2
prof v2-all "" $V2
echo "== $(date +%T) done"
