#!/bin/bash
# The rows of README.md's benchmark table, on one GPU, one process per row, most important first:
# ours beside the authors' release (with the numerics check), then the candidate speed-ups.
#
#   bash benchmark.sh RELEASE_DIR [OUT_DIR]      # RELEASE_DIR: a copy of Gsunshine/py-meanflow
#
# Each row writes OUT_DIR/ROW.json and OUT_DIR/ROW.log; a summary table ends the output. Every row
# compiles afresh (a minute or more), so a row starts only while BUDGET_S seconds (default 480)
# have not run out, and is cut off when they do. ROWS="side_by_side network" picks rows;
# BENCH_FLAGS are appended to every row's flags (e.g. "--batch_size 64", or "--preset tiny
# --device cpu --compile off" for a quick check of the script itself, without side_by_side).
set -u
release=${1:?usage: bash benchmark.sh RELEASE_DIR [OUT_DIR]}
out=${2:-bench_out}
budget=${BUDGET_S:-480}
cd "$(dirname "$0")"
mkdir -p "$out"

# side_by_side: our likely fastest equal-numerics step beside the release, in one process.
declare -A flags=(
  [side_by_side]="--jvp_mode network --baseline $release"
  [joint]="--jvp_mode joint"
  [network_channels_last]="--jvp_mode network --memory_format channels_last"
  [network_bf16]="--jvp_mode network --precision bf16"
  [network_cudagraphs]="--jvp_mode network --compile_mode reduce-overhead"
  [network_compiled_autograd]="--jvp_mode network --compiled_autograd"
  [network_max_autotune]="--jvp_mode network --compile_mode max-autotune-no-cudagraphs"
  [network_eager]="--jvp_mode network --compile off"
)
order=(side_by_side joint network_channels_last network_bf16 network_cudagraphs network_compiled_autograd
       network_max_autotune network_eager)

start=$SECONDS
for row in ${ROWS:-${order[@]}}; do
  [[ -v "flags[$row]" ]] || { echo "unknown row $row; rows: ${order[*]}"; exit 2; }
  left=$((budget - (SECONDS - start)))
  if ((left < 60)); then echo "$row: skipped, $left s of the budget left"; continue; fi
  # shellcheck disable=SC2086  # the flags are meant to split
  timeout "$left" python bench.py --preset cifar10-v1 ${flags[$row]} ${BENCH_FLAGS:-} --json "$out/$row.json" >"$out/$row.log" 2>&1
  echo "$row: exit $? after $((SECONDS - start)) s"
done

python - "$out" <<'EOF'
import json, sys
from pathlib import Path
paths = sorted(Path(sys.argv[1]).glob("*.json"), key=lambda p: p.stat().st_mtime)
for name, r in ((p.stem, json.loads(p.read_text())) for p in paths):
    for side in ("ours", "release"):
        f = r.get(side)
        if f is not None:
            print(f"{name:26s} {side:8s} {f['images_per_s']:8.1f} img/s {f['ms_per_step']:8.2f} ms/step "
                  f"peak {f['peak_memory_gib']:6.2f} GiB compile {f['compile_s']:6.1f} s"
                  + (f" {100 * f['fraction_of_peak']:5.1f}% of peak" if "fraction_of_peak" in f else ""))
    if "speedup" in r:
        print(f"{name:26s} ratio {r['speedup']:.2f}x on {r['device']}, {r['date']}")
    if r.get("numerics"):
        print(f"{name:26s} numerics {r['numerics']}")
    for what, error in r.get("errors", {}).items():
        print(f"{name:26s} FAILED {what}: {error}")
EOF
