#!/bin/bash
# GPU run 67: the least that settles the most (~4 min): every GPU test
# binary at the bundle's commit, the Python package's GPU tests, and the
# rule-7 race tests against the build before the fix (e05371e); with
# libnvcomp carried, prism-nvcomp's GPU tests run among the others. Output goes
# straight to $OUT, so a cut call still brings back what finished.
set -u
T0=$(date +%s)
mkdir -p "$OUT"
ROOT=$PWD
tar xzf bundle-slim.tar.gz && cd bundle || exit 1
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
S="$OUT/summary.txt"
nvidia-smi --query-gpu=name,driver_version --format=csv > "$S" 2>&1
echo "bundle $(cat COMMIT)" >> "$S"
xz -dc ../gpu/nvcomp/libnvcomp.so.6.xz > /tmp/libnvcomp.so.6 && export PRISM_NVCOMP_LIB=/tmp/libnvcomp.so.6
OUT= SANITIZE=0 EXAMPLES=0 NVTX=0 STEP_TIMEOUT=60 LOGS=$PWD/logs timeout 150 bash run.sh > "$OUT/tests.txt" 2>&1
echo "tests rc=$? at $(( $(date +%s) - T0 )) s" >> "$S"
grep -E "^--- " "$OUT/tests.txt" >> "$S"
grep -h "SKIPPED" logs/*.log | head -5 >> "$S"
python3 -m venv --system-site-packages /tmp/pyv >/dev/null 2>&1
/tmp/pyv/bin/pip install -q --no-index --no-deps "$ROOT"/gpu/pywheels/*.whl > "$OUT/py.txt" 2>&1
( cd "$ROOT/crates/prism-py" && PRISM_REQUIRE_GPU=1 timeout 45 /tmp/pyv/bin/python -m pytest -q -p no:cacheprovider tests/test_gpu.py >> "$OUT/py.txt" 2>&1 ; echo "python GPU tests rc=$? at $(( $(date +%s) - T0 )) s" >> "$S" ; tail -3 "$OUT/py.txt" >> "$S" )
PRISM_REQUIRE_GPU=1 timeout 25 ../gpu/old-gpu_adversarial-e05371e --test-threads=1 gpu_adversarial_graph > "$OUT/old-adversarial.txt" 2>&1
echo "old adversarial (e05371e) rc=$? at $(( $(date +%s) - T0 )) s" >> "$S"
for f in logs/*.log; do echo "==== $f"; cat "$f"; done > "$OUT/all-logs.txt" 2>/dev/null
echo "end at $(( $(date +%s) - T0 )) s" >> "$S"
