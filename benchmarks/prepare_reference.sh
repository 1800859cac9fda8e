#!/usr/bin/env bash
# Prepares the side by side with the reference DynaMight (benchmarks/reference_side_by_side.py)
# for a GPU machine without a package index, as ../shared/device/prepare.sh does for the
# project: the reference's `dynamight` package into .reference_dynamight/ (its commit in
# .reference_dynamight/COMMIT) and the wheels it needs beyond what the project carries into
# .whl/reference/ (tqdm, typer and what typer needs, scikit-learn; not numpy or scipy, which the
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
python3 -m pip download -q --no-deps "${WHEELS[@]}" scikit-learn joblib threadpoolctl
du -sh .reference_dynamight .whl/reference
echo "reference DynaMight $(cat .reference_dynamight/COMMIT)"
