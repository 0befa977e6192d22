#!/bin/bash
# The benchmark rows named in README.md, on one GPU, one process per row, most important first:
# ours beside the authors' release (with the numerics check), then the candidate speed-ups.
#
#   bash benchmark.sh RELEASE_DIR [OUT_DIR]      # RELEASE_DIR: a copy of Gsunshine/py-meanflow
#
# Each row writes OUT_DIR/ROW.json and OUT_DIR/ROW.log; a summary of the rows run ends the output,
# and the exit code is 1 if any row failed. Every row compiles afresh (a minute or more), so a row
# starts only while 150 of BUDGET_S seconds (default 480) are left, and is cut off when they run
# out. ROWS="side_by_side network_bf16" picks rows;
# BENCH_FLAGS are appended to every row's flags (e.g. "--batch_size 64", or "--preset tiny
# --device cpu --compile off" for a quick check of the script itself, without side_by_side).
set -u
release=$(realpath -m "${1:?usage: bash benchmark.sh RELEASE_DIR [OUT_DIR]}")
out=$(realpath -m "${2:-bench_out}")
budget=${BUDGET_S:-480}
mkdir -p "$out"
cd "$(dirname "$0")"

# side_by_side: our likely fastest equal-numerics step beside the release (--baseline RELEASE_DIR),
# in one process.
declare -A flags=(
  [side_by_side]="--jvp_mode network"
  [joint]="--jvp_mode joint"
  [network_channels_last]="--jvp_mode network --memory_format channels_last"
  [network_bf16]="--jvp_mode network --precision bf16"
  [network_cudagraphs]="--jvp_mode network --compile_mode reduce-overhead"
  [joint_bf16]="--jvp_mode joint --precision bf16"
  [network_compiled_autograd]="--jvp_mode network --compiled_autograd"
  [network_fused_adam]="--jvp_mode network --fused_adam"
  [network_max_autotune]="--jvp_mode network --compile_mode max-autotune-no-cudagraphs"
  [network_eager]="--jvp_mode network --compile off"
)
order=(side_by_side joint network_channels_last network_bf16 network_cudagraphs joint_bf16
       network_compiled_autograd network_fused_adam network_max_autotune network_eager)
rows=(${ROWS:-${order[@]}})
for row in "${rows[@]}"; do
  [[ -v "flags[$row]" ]] || { echo "unknown row $row; rows: ${order[*]}"; exit 2; }
done

start=$SECONDS
failed=0
ran=()
for row in "${rows[@]}"; do
  left=$((budget - (SECONDS - start)))
  if ((left < 150)); then echo "$row: skipped, $left s of the budget left"; continue; fi
  rm -f "$out/$row.json"
  # shellcheck disable=SC2206  # the flags are meant to split
  args=(--preset cifar10-v1 ${flags[$row]} ${BENCH_FLAGS:-} --json "$out/$row.json")
  [[ $row == side_by_side ]] && args+=(--baseline "$release")
  timeout "$left" python bench.py "${args[@]}" >"$out/$row.log" 2>&1
  code=$?
  echo "$row: exit $code after $((SECONDS - start)) s"
  ((code == 0)) || failed=1
  ran+=("$row")
done

python - "$out" "${ran[@]}" <<'EOF'
import json, sys
from pathlib import Path
paths = [Path(sys.argv[1]) / f"{row}.json" for row in sys.argv[2:]]
for name, r in ((p.stem, json.loads(p.read_text())) for p in paths if p.exists()):
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
exit $failed
