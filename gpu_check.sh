#!/bin/bash
# The first run on a GPU, as one script (about 10 minutes on one card): what the CPU tests cannot see.
#
#   bash gpu_check.sh [RELEASE_DIR] [OUT_DIR]     # RELEASE_DIR: a copy of Gsunshine/py-meanflow, or ""
#   DEVICE=cpu bash gpu_check.sh "" OUT_DIR       # the parts a CPU can run (the test suite does this)
#
# Parts, each recorded as pass / fail / skip in OUT_DIR/gpu_check.json (default OUT_DIR: gpu_check_out):
#   compile      compiled `tiny` runs under TORCH_LOGS=recompiles,graph_breaks, unconditional and guided
#                (class labels, omega 1.5, kappa 0.5, the guidance forwards in eval mode): at most one
#                graph break each (at loss.backward) and no recompile (CUDA only)
#   sync         one training step, after warm-up, under torch.cuda.set_sync_debug_mode("warn"): no
#                warning, i.e. nothing in the step waits for the GPU (CUDA only)
#   nccl         torchrun --nproc_per_node 1: an NCCL process group, all-reduce and barrier (CUDA only)
#   torchrun     train.py --preset tiny under torchrun --nproc_per_node 1, to its checkpoint
#   sample       sample.py on that checkpoint: an .npz and a grid
#   evaluate     evaluate.py on it: an FID with the Inception weights if present, else the one-line
#                error that names the weights file (never downloaded here)
#   bench_warm   benchmark.sh's side_by_side row once, 1 step, to fill the inductor cache: the two
#                cold compilations of the CIFAR-10 network, ours and the release's (BENCH_WARM_S, 300)
#   side_by_side benchmark.sh's side_by_side row, compiled from the warm cache (BENCH_ROW_S, 240)
#   rows         benchmark.sh's other rows while GPU_CHECK_BUDGET_S (570) lasts
# On CPU the benchmark part is one eager `tiny` row, to check the script. Exit code 1 if a part failed.
set -u
release=${1:-}
[[ -n $release ]] && release=$(realpath -m "$release")
out=$(realpath -m "${2:-gpu_check_out}")
device=${DEVICE:-cuda}
budget=${GPU_CHECK_BUDGET_S:-570}
mkdir -p "$out"
cd "$(dirname "$0")"
start=$SECONDS
results="$out/parts.tsv"
: >"$results"
export PYTHONUNBUFFERED=1

record() {  # record PART STATUS DETAIL
  printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$results"
  echo "$1: $2 ($3)"
}
tiny=(--preset tiny --device "$device")

# compile: the training step's graph breaks and recompiles, counted from the compiler's log, for the
# unconditional step and for the guided one.
if [[ $device == cuda ]]; then
  status=pass detail=""
  for kind in plain guided; do
    flags=()
    [[ $kind == guided ]] && flags=(--class_cond --cfg_omega 1.5 --cfg_kappa 0.5 --label_dropout 0.1 --dropout 0.1)
    TORCH_LOGS=recompiles,graph_breaks python train.py "${tiny[@]}" "${flags[@]}" --compile \
      --output_dir "$out/compile_$kind" >"$out/compile_$kind.log" 2>&1
    code=$?
    breaks=$(grep -c "Graph break" "$out/compile_$kind.log")
    recompiles=$(grep -c "Recompiling" "$out/compile_$kind.log")
    where=$(grep -m1 -A1 "Graph break" "$out/compile_$kind.log" | tr '\n\t' '  ' | cut -c1-160)
    ((code == 0 && breaks <= 1 && recompiles == 0)) || status=fail
    detail+="$kind: exit $code, $breaks graph breaks, $recompiles recompiles; $where. "
  done
  record compile $status "$detail"
else
  record compile skip "CPU: inductor's CPU compilation of a cold cache takes minutes"
fi

# sync: no host-device synchronisation inside a step once it is compiled and warm.
if [[ $device == cuda ]]; then
  python - "$out" >"$out/sync.log" 2>&1 <<'EOF'
import sys, warnings
import torch
from training.build import build_trainer
from training.config import resolve
from training.step import train_step
from utils.distributed import init_distributed

cfg = resolve(dict(preset="tiny", device="cuda", compile=True, output_dir=""), cuda_available=True)
trainer = build_trainer(cfg, init_distributed("cuda"))
for step in range(3):  # compilation, and the first steps' one-off work
    train_step(trainer, step)
torch.cuda.synchronize()
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    train_step(trainer, 3)
    torch.cuda.set_sync_debug_mode("default")
torch.cuda.synchronize()
syncs = [str(w.message).splitlines()[0] for w in seen if "synchroniz" in str(w.message).lower()]
print(f"SYNC_WARNINGS {len(syncs)}")
for message in syncs:
    print(message)
EOF
  code=$?
  count=$(sed -n 's/^SYNC_WARNINGS //p' "$out/sync.log")
  if ((code == 0)) && [[ $count == 0 ]]; then status=pass; else status=fail; fi
  record sync $status "exit $code, ${count:-?} synchronising calls in one step (sync.log lists them)"
else
  record sync skip "CPU: no device to synchronise with"
fi

# nccl: the library initialises, reduces and synchronises on this card.
if [[ $device == cuda ]]; then
  cat >"$out/nccl_check.py" <<'EOF'
import os
import torch
import torch.distributed as dist

torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group("nccl")
x = torch.ones(4, device="cuda") * (dist.get_rank() + 1)
dist.all_reduce(x)
dist.barrier()
assert x.sum().item() == 4 * sum(range(1, dist.get_world_size() + 1)), x
print("nccl", torch.cuda.nccl.version(), "all_reduce ok")
dist.destroy_process_group()
EOF
  torchrun --standalone --nproc_per_node 1 "$out/nccl_check.py" >"$out/nccl.log" 2>&1
  code=$?
  if ((code == 0)); then status=pass; else status=fail; fi
  record nccl $status "exit $code; $(grep -m1 '^nccl' "$out/nccl.log")"
else
  record nccl skip "CPU: NCCL needs CUDA"
fi

# torchrun: the launcher's path through train.py, to a checkpoint.
compile_flag=--not_compile
[[ $device == cuda ]] && compile_flag=--compile
torchrun --standalone --nproc_per_node 1 train.py "${tiny[@]}" $compile_flag --output_dir "$out/torchrun" \
  >"$out/torchrun.log" 2>&1
code=$?
ckpt="$out/torchrun/checkpoint-last.pth"
if ((code == 0)) && [[ -f $ckpt ]] && grep -q "^done: 8 steps" "$out/torchrun.log"; then status=pass; else status=fail; fi
record torchrun $status "exit $code; $(grep -m1 '^step 8/8' "$out/torchrun.log" | cut -c1-120)"

# sample: images and a grid from that checkpoint.
python sample.py --ckpt "$ckpt" --num_samples 16 --out "$out/samples.npz" --grid "$out/grid.png" \
  --device "$device" >"$out/sample.log" 2>&1
code=$?
if ((code == 0)) && [[ -f $out/samples.npz && -f $out/grid.png ]]; then status=pass; else status=fail; fi
record sample $status "exit $code"

# evaluate: the dataset's figure (the tiny preset's digits: their quality figure; FID for CIFAR-10 when the
# Inception weights are here, else the message saying where to put them).
python evaluate.py --ckpt "$ckpt" --ema net_ema --fid_samples 64 --batch_size 64 --no_download \
  --cache_dir "$out/fid_refs" --device "$device" >"$out/evaluate.log" 2>"$out/evaluate.err"
code=$?
cat "$out/evaluate.err" >>"$out/evaluate.log"
if ((code == 0)) && grep -qE "1-step (FID|digits quality)" "$out/evaluate.log"; then
  record evaluate pass "$(grep -m1 -E '1-step (FID|digits quality)' "$out/evaluate.log")"
elif ((code == 1)) && [[ $(wc -l <"$out/evaluate.err") == 1 ]] && grep -q "^error: .*weights-inception" "$out/evaluate.err"; then
  record evaluate pass "no Inception weights here: one error line names the file"
else
  record evaluate fail "exit $code; see evaluate.log"
fi

# Benchmarks: on a GPU the side_by_side row beside the release from a warm inductor cache, then the
# other rows while the budget lasts; on CPU one eager tiny row checks benchmark.sh itself.
bench_row() {  # bench_row PART BUDGET_S OUT ROWS [BENCH_FLAGS]
  ROWS="$4" BUDGET_S="$2" BENCH_FLAGS="${5:-}" bash benchmark.sh "${release:-none}" "$3" >"$out/$1.log" 2>&1
  local code=$?
  if ((code == 0)); then status=pass; else status=fail; fi
  record "$1" $status "exit $code; $(grep -E 'img/s|ratio|FAILED|skipped' "$out/$1.log" | head -3 | tr '\n' ';' | cut -c1-300)"
}
if [[ $device != cuda ]]; then
  bench_row rows 160 "$out/bench" joint "--preset tiny --device cpu --compile off --steps 2 --warmup 1 --no_flops"
elif [[ -z $release || ! -d $release ]]; then
  record side_by_side skip "no RELEASE_DIR given: git clone https://github.com/Gsunshine/py-meanflow"
  left=$((budget - (SECONDS - start)))
  bench_row rows "$left" "$out/bench" "joint network_bf16 network_channels_last"
else
  bench_row bench_warm "${BENCH_WARM_S:-300}" "$out/bench_warm" side_by_side "--steps 1 --warmup 1 --no_flops"
  bench_row side_by_side "${BENCH_ROW_S:-240}" "$out/bench" side_by_side
  left=$((budget - (SECONDS - start)))
  if ((left >= 150)); then
    bench_row rows "$left" "$out/bench_rows" "joint network_bf16 network_channels_last network_cudagraphs"
  else
    record rows skip "$left s of GPU_CHECK_BUDGET_S left"
  fi
fi

python - "$out" "$device" "$((SECONDS - start))" <<'EOF'
import datetime, json, platform, sys
from pathlib import Path
import torch
out, device, seconds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
parts = {}
for line in (out / "parts.tsv").read_text().splitlines():
    name, status, detail = line.split("\t", 2)
    parts[name] = {"status": status, "detail": detail}
card = torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else platform.processor() or platform.machine()
summary = {"device": card, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
           "seconds": seconds, "passed": all(p["status"] != "fail" for p in parts.values()), "parts": parts}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"{card}, torch {torch.__version__}, {seconds} s: " + ", ".join(f"{k} {v['status']}" for k, v in parts.items()))
print(f"wrote {out / 'gpu_check.json'}")
EOF
! grep -q $'\tfail\t' "$results"
