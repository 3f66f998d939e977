#!/usr/bin/env bash
# Wheel smoke test: build a (non-editable) wheel of this checkout, install it into a fresh venv outside
# the checkout, and check from a folder outside the checkout that the packaged recipes and teacher
# cards (kd_detr/_zoo, copied there by setup.py's build_py) are found, then run a 2-iteration
# distillation with the shipped quickstart teacher.
#
# Run with the CI venv active (.ci/run does): the smoke venv reuses that venv's heavy dependencies
# (torch, torchvision, ray, ...) through a .pth file instead of reinstalling them; the CI venv's
# editable kd_detr must not be importable there (checked below).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd -P)
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
# only the packaged folders may count: no user folders, no checkout on the path
unset KD_DETR_RECIPES KD_DETR_TEACHERS PYTHONPATH PYTHONHOME

python=${PYTHON:-python}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/kd_detr_wheel_smoke.XXXXXX")
tmp=$(cd "$tmp" && pwd -P)
trap 'rm -rf "$tmp"' EXIT
case "$tmp/" in "$repo"/*) echo "wheel_smoke: temp dir $tmp is inside the checkout" >&2; exit 1;; esac

say() { printf '\n=== wheel_smoke: %s\n' "$*"; }

# --- build: setuptools' build/ goes to $tmp too (a reused in-tree build/lib could ship deleted modules)
say "building the wheel from $repo"
printf '[build]\nbuild_base = %s\n' "$tmp/build" > "$tmp/build.cfg"
DIST_EXTRA_CONFIG="$tmp/build.cfg" "$python" -m pip wheel -q --no-deps -w "$tmp/wheel" .
wheels=("$tmp"/wheel/kd_detr-*.whl)
[ "${#wheels[@]}" -eq 1 ] && [ -f "${wheels[0]}" ] || { echo "expected one kd_detr wheel, got: ${wheels[*]}" >&2; exit 1; }
wheel=${wheels[0]}
"$python" - "$wheel" <<'PY'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
zoo = sorted(n for n in names if n.startswith("kd_detr/_zoo/"))
print("\n".join(zoo))
need = ["kd_detr/_zoo/recipes/d3etr.toml", "kd_detr/_zoo/recipes/baseline.toml", "kd_detr/_zoo/recipes/README.md",
        "kd_detr/_zoo/teachers/quickstart_teacher.toml", "kd_detr/_zoo/teachers/quickstart_teacher.safetensors",
        "kd_detr/_zoo/teachers/README.md", "kd_detr/zoo.py"]
missing = [n for n in need if n not in names]
sys.exit(f"wheel lacks {missing}" if missing else None)
PY

# --- a fresh venv outside the checkout; install the wheel BEFORE exposing the CI venv's packages,
# so pip sees no other kd-detr (and never tries to uninstall the CI venv's editable one)
say "installing it into a fresh venv"
"$python" -m venv "$tmp/venv"
vpy="$tmp/venv/bin/python"
"$vpy" -m pip install -q --no-deps "$wheel"
smoke_site=$("$vpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# plain path lines: appended after the smoke venv's own site-packages, and the .pth files in those
# folders (the editable install's __editable__*.pth finder among them) are NOT executed
"$python" -c 'import sysconfig; p = sysconfig.get_paths(); print(p["purelib"]); print(p["platlib"])' \
    | awk '!seen[$0]++' > "$smoke_site/_kd_detr_ci_venv_deps.pth"
cat "$smoke_site/_kd_detr_ci_venv_deps.pth"

mkdir "$tmp/job"
cd "$tmp/job"  # nothing below may see the checkout
export SMOKE_PREFIX="$tmp/venv"
"$vpy" - <<'PY'
import os, sys
from pathlib import Path
import kd_detr
prefix = Path(os.environ["SMOKE_PREFIX"]).resolve()
where = Path(kd_detr.__file__).resolve()
print("kd_detr from", where)
assert prefix in where.parents, f"kd_detr imported from {where}, not from the smoke venv {prefix}"
assert "__editable___kd_detr_0_1_0_finder" not in sys.modules and not any(
    "editable" in type(f).__name__.lower() or "editable" in getattr(f, "__name__", "").lower()
    for f in sys.meta_path), f"an editable finder is active: {sys.meta_path}"
import torch  # from the CI venv, through the .pth
print("torch", torch.__version__, "from", Path(torch.__file__).parent)
PY

# --- the checks: each one runs even when an earlier one failed; the summary says which failed
failed=()
check() {
    local name=$1; shift
    say "check: $name"
    local rc=0
    # not `if ( ... )`: bash ignores set -e inside a tested command, so a failing step would not stop
    set +e; ( set -euo pipefail; "$@" ); rc=$?; set -e
    if [ "$rc" -eq 0 ]; then echo "--- ok: $name"; else echo "--- FAILED ($rc): $name" >&2; failed+=("$name"); fi
}

recipes_listed() {
    local out
    out=$("$tmp/venv/bin/kd-detr" recipes)
    echo "$out"
    grep -qE '^d3etr([[:space:]]|$)' <<<"$out" || { echo "kd-detr recipes does not list d3etr" >&2; return 1; }
}

teacher_card_packaged() {
    "$vpy" - <<'PY'
import os
from pathlib import Path
from kd_detr.zoo import TEACHERS
prefix = Path(os.environ["SMOKE_PREFIX"]).resolve()
card = TEACHERS.require("quickstart_teacher")
print("quickstart_teacher card:", card)
assert prefix in card.parents, f"card {card} is not inside the smoke venv {prefix}"
weights = card.with_name("quickstart_teacher.safetensors")
assert weights.is_file() and weights.stat().st_size > 1_000_000, f"no packaged weights at {weights}"
PY
}

smoke_distill() {
    local kd="$tmp/venv/bin/kd-detr" d="$tmp/job/data" out="$tmp/job/distill"
    "$kd" data synth --out "$d" --train 8 --val 4 --image-size 64 --class-colours
    "$kd" distill --teacher quickstart_teacher --student cond_detr_r10_tiny --student-opt num_queries=10 --student-opt dec_layers=3 \
        --recipe d3etr --data "$d" --image-size 64 --num-workers 0 --output-dir "$out" --no-progress \
        --set train.max_iters=2 --set train.batch_size=2 --set train.eval_every_epochs=0 \
        --set teacher_check.image_size=false
    [ -f "$out/model_final.safetensors" ] || { echo "no $out/model_final.safetensors" >&2; ls -la "$out" >&2 || true; return 1; }
}

check "kd-detr recipes lists d3etr" recipes_listed
check "quickstart teacher card found inside the installed package" teacher_card_packaged
check "2-iteration distillation with the packaged teacher and recipe" smoke_distill

if [ "${#failed[@]}" -gt 0 ]; then
    say "FAILED: $(printf '%s; ' "${failed[@]}")"
    exit 1
fi
say "all checks passed"
