#!/usr/bin/env bash
# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
#
# The GPU figures in one call: installs what it needs, builds a checkpoint, and records
#   1. calibration tokens/s of both engines (whole-model forward, layer streaming),
#   2. merge time with --cuda against one raw read of the checkpoint,
#   3. `refit: fit` time per layer (skipped, with the library's message, where it is refused),
#   4. `heal` tokens/s against a plain transformers distillation loop on the same student, both
#      with the teacher on the fly and both in steady state (the heal's logged rates after its
#      first log, the loop's steps after its first: start-up is timed in neither),
# into $OUT (or ./gpu_check.out)/gpu_check.json and gpu_check.md (a table for docs/results/scale.md).
#
#   bash benchmarks/gpu_check.sh                          # on the GPU machine: --device cuda, 4 GB
#   bash benchmarks/gpu_check.sh --device cpu --smoke     # a minute on a CPU: checks the script
#
# On a GPU machine with no network, run bash benchmarks/gpu_wheels.sh where pip reaches PyPI first
# and carry .whl/ along: this installs those wheels where mergekit or pydantic is missing.
#
# Options: --device cuda|cpu (default cuda), --size-gb N (4), --tokens N (2048), --heal-tokens N
# (32768; 4096 with --smoke), --smoke (a tiny model), --workdir DIR (default: a temporary directory, removed after).
set -euo pipefail
cd "$(dirname "$0")/.."

COMMAND="bash benchmarks/gpu_check.sh${*:+ $*}"
DEVICE=cuda SIZE_GB=4 TOKENS=2048 HEAL_TOKENS="" SMOKE="" WORKDIR=""
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE=$2; shift 2 ;;
        --size-gb) SIZE_GB=$2; shift 2 ;;
        --tokens) TOKENS=$2; shift 2 ;;
        --heal-tokens) HEAL_TOKENS=$2; shift 2 ;;
        --smoke) SMOKE=--smoke; shift ;;
        --workdir) WORKDIR=$2; shift 2 ;;
        *) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
[ -z "$HEAL_TOKENS" ] && { [ -n "$SMOKE" ] && HEAL_TOKENS=4096 || HEAL_TOKENS=32768; }
RESULTS=${OUT:-$PWD/gpu_check.out}
mkdir -p "$RESULTS"
if [ -z "$WORKDIR" ]; then WORKDIR=$(mktemp -d "${TMPDIR:-/tmp}/moe2dense-gpu-check-XXXXXX"); trap 'rm -rf "$WORKDIR"' EXIT; fi
mkdir -p "$WORKDIR"
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" >&2; }

# -- 1. what it needs: a Python with torch (CUDA for --device cuda), and this package's needs ------
# The lent H200 has no network: its image holds torch, transformers, accelerate, peft, ... but not
# mergekit or pydantic, which travel as wheels in .whl/ (bash benchmarks/gpu_wheels.sh, here first).
PYTHON=${PYTHON:-}
for candidate in "$PYTHON" .venv/bin/python python3 python; do
    if [ -n "$candidate" ] && command -v "$candidate" > /dev/null && "$candidate" -c "import torch" 2> /dev/null; then
        PYTHON=$candidate; break
    fi
done
if [ -z "$PYTHON" ] || ! "$PYTHON" -c "import torch" 2> /dev/null; then
    log "no Python with torch found: installing torch into .venv"
    python3 -m venv .venv && PYTHON=.venv/bin/python
    "$PYTHON" -m pip install -q "torch>=2.4,<3"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # this package from the working tree, installed or not
has_needs() { "$PYTHON" -c "import mergekit_moe2dense.cli, mergekit, pydantic, transformers" 2> /dev/null; }
if ! has_needs && compgen -G ".whl/*.whl" > /dev/null; then
    SITE=${TMPDIR:-/tmp}/moe2dense-site
    log "installing the wheels of .whl/ into $SITE"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    export PYTHONPATH=$PWD:$SITE${PYTHONPATH#"$PWD"}
fi
if ! has_needs; then
    log "installing this package's dependencies from the package index"
    "$PYTHON" -m pip install -q -e . || {
        log "cannot install them: on a machine with no network, run bash benchmarks/gpu_wheels.sh first and carry .whl/"
        exit 1
    }
fi
MOE2DENSE=("$PYTHON" -m mergekit_moe2dense)  # no console script needed
"$PYTHON" - "$DEVICE" << 'EOF'
import sys
import torch
device = sys.argv[1]
if device == "cuda" and not torch.cuda.is_available():
    sys.exit("gpu_check.sh: --device cuda, but torch sees no GPU (torch %s)" % torch.__version__)
name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
print(f"torch {torch.__version__} on {name}", file=sys.stderr)
EOF
CUDA=""; [ "$DEVICE" = cuda ] && CUDA=--cuda

# -- 2. calibration (both engines), refit: fit per layer, merge against one raw read -----------------
log "scale benchmark: ${SIZE_GB} GB checkpoint${SMOKE:+ (smoke)}, $TOKENS calibration tokens, $DEVICE"
"$PYTHON" benchmarks/scale.py --size-gb "$SIZE_GB" --tokens "$TOKENS" $SMOKE $CUDA \
    --calibration-dtype bfloat16 --conversions refit_fit --no-linear \
    --keep --workdir "$WORKDIR/scale" --json "$RESULTS/scale.json" > "$RESULTS/scale.log"
grep -v '^[ {}]' "$RESULTS/scale.log" >&2 || true

# -- 3. heal tokens/s against a plain transformers loop on the same student ------------------------------
MOE=$WORKDIR/scale/moe
STUDENT=$WORKDIR/student
HEAL_JSON=$RESULTS/heal.json
log "heal: a dense student (expert_uniform), then heal vs a plain loop, $HEAL_TOKENS tokens each"
echo "{\"merge_method\": \"expert_uniform\", \"models\": [{\"model\": \"$MOE\"}], \"dtype\": \"bfloat16\"}" > "$WORKDIR/student.yml"
"${MOE2DENSE[@]}" "$WORKDIR/student.yml" "$STUDENT" --quiet --overwrite $CUDA
SEQ=128; [ -n "$SMOKE" ] && SEQ=16
# logged every 4 steps, so that the steady-state rate has several intervals to average
"${MOE2DENSE[@]}" heal "$STUDENT" "$WORKDIR/healed" --teacher "$MOE" \
    --data "$WORKDIR/scale/calib.txt" --max-tokens "$HEAL_TOKENS" --seq-len $SEQ --batch-size 4 \
    --logging-steps 4 --device "$DEVICE" --dtype bfloat16 --quiet --overwrite 2>&1 | tail -1 >&2
"$PYTHON" - "$STUDENT" "$MOE" "$WORKDIR/scale/calib.txt" "$HEAL_TOKENS" $SEQ "$DEVICE" "$WORKDIR/healed/heal.json" "$HEAL_JSON" << 'EOF'
"""A plain transformers distillation loop: forward KL to the teacher, AdamW, clipping, bf16 autocast."""
import json, sys, time
import torch
import transformers
student_path, teacher_path, data, tokens, seq, device, heal_record, out = sys.argv[1:]
tokens, seq = int(tokens), int(seq)
tok = transformers.AutoTokenizer.from_pretrained(student_path)
ids = tok(open(data).read(), return_tensors="pt").input_ids[0]
student = transformers.AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32).to(device).train()
teacher = transformers.AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.bfloat16).to(device).eval()
optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
batch, done, step = 4, 0, 0
autocast = torch.autocast(device_type=device, dtype=torch.bfloat16)
start = None
while done < tokens:
    offset = (step * batch * seq) % max(1, len(ids) - batch * seq)
    x = ids[offset : offset + batch * seq].reshape(batch, seq).to(device)
    with torch.no_grad(), autocast:
        target = torch.log_softmax(teacher(x).logits.float(), -1)
    with autocast:
        logp = torch.log_softmax(student(x).logits.float(), -1)
    loss = torch.nn.functional.kl_div(logp, target, log_target=True, reduction="batchmean")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)  # as the Trainer does
    optimizer.step(); optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    if start is None:  # the first step warms up (kernels, allocator): not timed
        start = time.perf_counter()
    else:
        done += batch * seq
    step += 1
plain = done / (time.perf_counter() - start)
record = json.load(open(heal_record))
rates = record["tokens_per_s_logged"]  # each logging interval after the first
if not rates:
    sys.exit(f"gpu_check.sh: the heal logged no steady-state rate ({record['steps']} steps): raise --heal-tokens")
heal = sum(rates) / len(rates)
result = {"heal_tokens_per_s": heal, "heal_tokens_per_s_with_start_up": record["tokens_per_s"],
          "plain_loop_tokens_per_s": plain, "heal_vs_plain": heal / plain, "tokens": tokens, "seq_len": seq}
json.dump(result, open(out, "w"), indent=1)
print(f"heal {heal:.1f} tokens/s, plain transformers loop {plain:.1f} tokens/s", file=sys.stderr)
EOF

# -- 4. one table -------------------------------------------------------------------------------------
"$PYTHON" - "$RESULTS" "$DEVICE" "$COMMAND" << 'EOF'
import json, sys
from pathlib import Path
results, device, command = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
scale, heal = json.loads((results / "scale.json").read_text()), json.loads((results / "heal.json").read_text())
try:
    import torch
    name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
except Exception:
    name = device
ck = scale["checkpoint"]
rows = [f"Device: {name}. Checkpoint {ck['bytes'] / 1e9:.2f} GB, {ck['layers']} layers. Command: `{command}`.", "",
        "| measurement | figure |", "|---|---|"]
calib = scale.get("calibration", {})
for engine in ("full", "layerwise"):
    if engine in calib:
        rows.append(f"| calibration `{engine}`, bf16 | {calib[engine]['tokens_per_s']:.1f} tokens/s, peak RSS {calib[engine]['peak_rss_bytes'] / 1e9:.2f} GB |")
if "ratios" in calib:
    rows.append(f"| layerwise / full throughput | {calib['ratios']['throughput_layerwise_vs_full']:.2f}x |")
merge = scale["merge"]
rows.append(f"| merge (expert_uniform{', --cuda' if device == 'cuda' else ''}) | {merge['moe2dense']['wall_s']:.1f} s |")
rows.append(f"| one raw read of the checkpoint | {merge['raw_read']['wall_s']:.1f} s |")
rows.append(f"| one raw read with O_DIRECT | {merge['raw_read_direct']['wall_s']:.1f} s |")
rows.append(f"| merge / raw read (mean of before and after) | {merge['ratios']['moe2dense_vs_raw_read']:.2f}x plain, {merge['ratios']['moe2dense_vs_raw_read_direct']:.2f}x O_DIRECT |")
fit = scale.get("conversion", {}).get("refit_fit", {})
if "skipped" in fit:
    rows.append(f"| `refit: fit` per layer | skipped: {fit['skipped']} |")
elif fit:
    rows.append(f"| `refit: fit` per layer | {fit['refit_s_per_layer']:.2f} s |")
rows.append(f"| `heal` / plain transformers distillation loop (steady state) | {heal['heal_tokens_per_s']:.1f} / "
            f"{heal['plain_loop_tokens_per_s']:.1f} tokens/s ({heal['heal_vs_plain']:.2f}x) |")
(results / "gpu_check.md").write_text("\n".join(rows) + "\n")
json.dump({"device": name, "scale": scale, "heal": heal}, open(results / "gpu_check.json", "w"), indent=1)
print("\n".join(rows))
EOF
