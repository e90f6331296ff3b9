#!/bin/bash
# The checks that need an NVIDIA GPU, as one script for a short lease of a GPU machine:
#   1. the CUDA platform loads (plugin failures are printed);
#   2. tests/test_cuda.py and the CUDA cases of tests/test_forces.py (Reference vs CUDA, with and without graphs);
#   3. benchmarks/bias_overhead.py on CUDA, ala2 explicit and implicit, without and with CUDA graphs;
#   4. benchmarks/training_throughput.py on CUDA (reference, ours, ours replayed from a CUDA graph).
# Results land in $OUT (default /tmp/nct-device-check): gpu.txt, pytest.txt, bias_cuda*.{json,txt},
# training_cuda.{json,txt}. The last lines say which steps failed; the exit status counts them.
#
# Python packages the machine lacks travel as cp312 wheels in .whl/ (see the device README: openmm, openmm-cuda-13,
# acellera-openmmtorch-cu13, mdtraj, openmmtools, mpiplus, netCDF4, cftime, pymbar, numexpr); torch comes with it.
# Usage, from the repository root: bash benchmarks/device_check.sh [bias_overhead options...]
set -u
OUT=${OUT:-/tmp/nct-device-check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
# Wheels installed with --target do not find torch's libraries through their relative run paths; OpenMM loads its
# plugins at import, before torch is loaded.
export LD_LIBRARY_PATH=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
failed=""
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$OUT/gpu.txt"
python3 - <<'EOF' 2>&1 | tee -a "$OUT/gpu.txt"
import openmm, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "openmm", openmm.__version__)
print("platforms", [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())])
print("plugin failures", openmm.Platform.getPluginLoadFailures())
EOF
set -o pipefail
# SHORT=1: the essentials in three to six minutes (explicit water only, fewer rounds and training steps; the CUDA
# tests get 180 s, since they now cover 1-3 modes, phi > 0 and a resumed graph training).
if [ -n "${SHORT:-}" ]; then
    bias_systems="ala2-explicit" bias_variants="plain nct-mts8 student student-mts8 dstudent dstudent-mts8 student-mts16"
    bias_rounds=2 bias_limit=120
    training_options="--rounds 2 --steps 10 --loss-steps 200 --chain-steps 200" limit=75 test_limit=180
else
    bias_systems="ala2-explicit ala2-implicit"
    bias_variants="plain plain-mts naive nct nct-mts4 nct-mts8 nct-mts8-symmetric student student-mts8 student-mts16 dstudent dstudent-mts4 dstudent-mts8"
    bias_rounds=3 bias_limit=180 training_options="--rounds 3 --steps 20" limit=180 test_limit=180
fi
bias() {  # $1: name, then bias_overhead options
    local name=$1
    shift
    SECONDS=0
    timeout $bias_limit python3 benchmarks/bias_overhead.py --platform CUDA --system $bias_systems \
        --variants $bias_variants --rounds $bias_rounds --steps 512 --json "$OUT/$name.json" "$@" \
        2>&1 | tee "$OUT/$name.txt" | tail -20 || failed="$failed $name"
    echo "$name: ${SECONDS} s"
}
bias bias_cuda_graphs --cuda-graphs "$@"
SECONDS=0
timeout $test_limit python3 -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py tests/test_forces.py -k "cuda or CUDA" \
    2>&1 | tee "$OUT/pytest.txt" | tail -25 || failed="$failed pytest"
echo "pytest: ${SECONDS} s"
SECONDS=0
timeout $limit python3 benchmarks/training_throughput.py --device cuda $training_options \
    --json "$OUT/training_cuda.json" 2>&1 | tee "$OUT/training_cuda.txt" | tail -30 || failed="$failed training"
echo "training_cuda: ${SECONDS} s"
[ -n "${SHORT:-}" ] || bias bias_cuda "$@"
echo "failed steps:${failed:- none}"
[ -z "$failed" ]
