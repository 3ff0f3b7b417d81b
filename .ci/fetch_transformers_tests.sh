#!/usr/bin/env bash
# Fetch transformers' own common model-test mixins (tests/test_modeling_common.py, tests/test_configuration_common.py
# and their siblings) for the transformers version installed in the active Python, for
# tests/test_transformers_conformance.py.
#
#   bash .ci/fetch_transformers_tests.sh          # uses `python`; PYTHON=/path/to/python to pick another
#
# What it does: reads transformers.__version__ with that Python, downloads that exact version's sdist from PyPI
# (`pip download --no-deps --no-binary :all:`; TRANSFORMERS_SDIST_DIR=DIR reuses a transformers-X.tar.gz already in
# DIR instead) and extracts only its tests/ tree to .ci/transformers-tests/<version>/hf_tests/ (git-ignored).
# The package is renamed from `tests` to `hf_tests` (absolute imports `from tests.` / `import tests.` rewritten) so
# that it can never be confused with this repository's own tests/ folder, and an empty __init__.py is added to each
# folder (the sdist has none; test_configuration_common.py needs hf_tests/__init__.py to exist).
#
# Note: the sdist ships only the top-level tests/*.py files: not tests/generation/ (GenerationTesterMixin),
# tests/exporters/ (ExportTesterMixin), tests/utils/ (config_common_kwargs) nor tests/models/. The test module stands
# in for those three imports and says so in its skip reasons; see its docstring.
#
# Idempotent: does nothing when that version is already extracted. Exits non-zero, with a message, when the version
# cannot be read, the download fails or the archive lacks the mixins.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python}"
die() {
  echo "fetch_transformers_tests.sh: ERROR: $*" >&2
  exit 1
}

VERSION="$("$PY" -c 'import transformers; print(transformers.__version__)')" ||
  die "could not import transformers with '$PY' (install the packages first, or set PYTHON)."
[[ "$VERSION" =~ ^[0-9A-Za-z.+-]+$ ]] || die "unexpected transformers version string '$VERSION'."

ROOT=".ci/transformers-tests"
DEST="$ROOT/$VERSION"
if [[ -f "$DEST/COMPLETE" && -f "$DEST/hf_tests/test_modeling_common.py" ]]; then
  echo "fetch_transformers_tests.sh: transformers $VERSION tests already in $DEST"
  exit 0
fi

mkdir -p "$ROOT"
WORK="$(mktemp -d "$ROOT/.tmp.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

SDIST_NAME="transformers-$VERSION.tar.gz"
if [[ -n "${TRANSFORMERS_SDIST_DIR:-}" && -f "$TRANSFORMERS_SDIST_DIR/$SDIST_NAME" ]]; then
  SDIST="$TRANSFORMERS_SDIST_DIR/$SDIST_NAME"
  echo "fetch_transformers_tests.sh: using $SDIST"
else
  echo "fetch_transformers_tests.sh: downloading the transformers $VERSION sdist from PyPI"
  if ! "$PY" -m pip download --quiet --no-deps --no-binary :all: "transformers==$VERSION" -d "$WORK/dl"; then
    die "pip download of the transformers==$VERSION sdist failed (see pip's output above). The conformance tests
(tests/test_transformers_conformance.py) need it; a source-only version (e.g. X.dev0) has no sdist on PyPI."
  fi
  SDIST="$WORK/dl/$SDIST_NAME"
  [[ -f "$SDIST" ]] || die "pip download succeeded but $SDIST_NAME is not in $WORK/dl: $(ls "$WORK/dl")"
fi

tar -xzf "$SDIST" --no-same-owner -C "$WORK" "transformers-$VERSION/tests" ||
  die "$SDIST has no transformers-$VERSION/tests/ folder."
TESTS="$WORK/transformers-$VERSION/tests"
for f in test_modeling_common.py test_configuration_common.py; do
  [[ -f "$TESTS/$f" ]] || die "$SDIST lacks tests/$f."
done

# `tests` -> `hf_tests` in absolute imports (relative imports need no change); a package marker in every folder.
find "$TESTS" -name '*.py' -print0 |
  xargs -0 sed -i -E 's/^([[:space:]]*)from tests([. ])/\1from hf_tests\2/; s/^([[:space:]]*)import tests([. ]|$)/\1import hf_tests\2/'
find "$TESTS" -type d -print0 | while IFS= read -r -d '' d; do
  [[ -f "$d/__init__.py" ]] || : >"$d/__init__.py"
done

rm -rf "$DEST"
mkdir -p "$DEST"
mv "$TESTS" "$DEST/hf_tests"
sha256sum "$SDIST" | awk -v v="$VERSION" '{print "transformers " v " sdist sha256 " $1}' >"$DEST/COMPLETE"
echo "fetch_transformers_tests.sh: transformers $VERSION tests extracted to $DEST/hf_tests"
