#!/usr/bin/env bash
# Prepares the side by side with the reference DynaMight (benchmarks/reference_side_by_side.py)
# for a GPU machine without a package index, as ../shared/device/prepare.sh does for the
# project: the reference's `dynamight` package into .reference_dynamight/ (its commit in
# .reference_dynamight/COMMIT) and the wheels it needs beyond what the project carries into
# .whl/reference/ (tqdm, typer, scikit-learn and what they need, checked; not numpy or scipy, which the
# GPU machines have). Both are git-ignored through .git/info/exclude; carry both.
#
#   bash benchmarks/prepare_reference.sh [SOURCE]
#
# SOURCE: a git repository of github.com/3dem/DynaMight, bare or not (default: cloned from
# GitHub). Run in the project root. Nothing of the reference becomes part of the project.
set -euo pipefail
SOURCE=${1:-https://github.com/3dem/DynaMight}
for path in /.reference_dynamight/ /.whl/; do
  grep -qx "$path" .git/info/exclude 2>/dev/null || echo "$path" >> .git/info/exclude
done
if [ -d "$SOURCE" ]; then
  GIT=$SOURCE
else
  GIT=$(mktemp -d)
  git clone -q --bare "$SOURCE" "$GIT"
fi
rm -rf .reference_dynamight .whl/reference
mkdir -p .reference_dynamight .whl/reference
git -C "$GIT" archive HEAD dynamight | tar -x -C .reference_dynamight
find .reference_dynamight -name __pycache__ -prune -exec rm -rf {} +
git -C "$GIT" rev-parse HEAD > .reference_dynamight/COMMIT
WHEELS=(--only-binary=:all: --python-version 3.12 --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform any -d .whl/reference)
python3 -m pip download -q "${WHEELS[@]}" tqdm typer
python3 -m pip download -q --no-deps "${WHEELS[@]}" scikit-learn joblib threadpoolctl narwhals \
  cloudpickle
# every requirement of the carried wheels is carried too, but numpy and scipy (the machines'
# own) and colorama (Windows only)
python3 - <<'PY'
import re, sys, zipfile
from pathlib import Path
def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()
wheels = list(Path(".whl/reference").glob("*.whl"))
have = {norm(w.name.split("-")[0]) for w in wheels} | {"numpy", "scipy", "colorama"}
missing = set()
for wheel in wheels:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist:") and "extra ==" not in line:
                name = norm(re.split(r"[ ;<>=!~\[(]", line.split(":", 1)[1].strip())[0])
                if name not in have:
                    missing.add(f"{name} (for {wheel.name})")
if missing:
    sys.exit("not carried: " + ", ".join(sorted(missing)))
PY
du -sh .reference_dynamight .whl/reference
echo "reference DynaMight $(cat .reference_dynamight/COMMIT)"
