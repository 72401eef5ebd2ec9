#!/usr/bin/env bash
# mergekit's source distribution from the package index, with upstream/'s patches and without, each
# installed in a virtual environment of its own making (build/upstream/venv) together with this package
# (built as a wheel, so its entry point and .pth hook are installed as a user gets them):
#   1. unpatched mergekit: mergekit's own test suite, with our plugin (the .pth hook) installed, and our
#      mergekit-yaml tests through the hook;
#   2. patched mergekit: upstream/*.patch must apply cleanly; mergekit's suite (the patch's test
#      included), and our tests through the `mergekit.plugins` entry point.
# The sdist ships the tests that import tests/common.py but not that file: ours stands in for it
# (upstream/sdist_tests/common.py), so that the whole suite runs. .ci/run calls this after our tests.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
# the version the patches are made against: the lower bound of our mergekit requirement
MERGEKIT_VERSION=${MERGEKIT_VERSION:-0.1.5}
WORK=$ROOT/build/upstream
VENV=$WORK/venv
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
unset PYTHONPATH

step() { printf '\n== %s (%ds so far)\n' "$1" "$SECONDS"; }
pip() { "$VENV/bin/python" -m pip -q --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location" >&2); }
unpack() {  # unpack DIR: a fresh copy of the sdist's tree in DIR
    rm -rf "$1" && mkdir -p "$1" && tar -xzf "$WORK"/dist/mergekit-"$MERGEKIT_VERSION".tar.gz -C "$1" --strip-components=1
}
mergekit_suite() {  # mergekit_suite TREE: mergekit's tests of TREE, run against the installed mergekit
    local suite=$WORK/suite-$(basename "$1")
    rm -rf "$suite" && mkdir -p "$suite"
    cp -r "$1"/tests "$1"/pyproject.toml "$suite"/
    cp upstream/sdist_tests/common.py "$suite"/tests/common.py
    touch "$suite"/tests/__init__.py
    (cd "$suite" && "$VENV"/bin/pytest -q -p no:cacheprovider tests)
}
our_plugin_tests() {
    # test_cli's mergekit-yaml tests (the end-to-end run of the console script included) and ours
    "$VENV"/bin/pytest -q -p no:cacheprovider tests/test_plugin_entry_point.py tests/test_cli.py \
        -k "plugin or mergekit_yaml or mergekit-yaml"
}

step "virtual environment, mergekit $MERGEKIT_VERSION's sdist"
# A venv left by an earlier run is reused for its dependencies (rm -rf build/upstream for a new
# one); mergekit and this package are installed afresh either way.
rm -rf "$WORK"/dist "$WORK"/unpatched "$WORK"/patched "$WORK"/suite-*
reused=true
[ -x "$VENV"/bin/python ] || { reused=false; "$PYTHON" -m venv "$VENV"; }
pip install "torch==2.13.0"  # first: a bare torch requirement would pull a multi-GB CUDA build
pip download --no-deps --no-binary :all: "mergekit==$MERGEKIT_VERSION" -d "$WORK"/dist

step "unpatched mergekit and this package"
unpack "$WORK"/unpatched
pip install "$WORK/unpatched[test]" "$ROOT[test]"
if $reused; then pip install --no-deps --force-reinstall "$WORK"/unpatched "$ROOT"; fi
"$VENV"/bin/python -c "import importlib.util as u; assert u.find_spec('mergekit.plugins') is None"

step "mergekit's suite, unpatched, with our plugin installed"
mergekit_suite "$WORK"/unpatched
step "our mergekit-yaml tests through the .pth hook"
our_plugin_tests

step "upstream/ patches"
unpack "$WORK"/patched
for patch in upstream/[0-9][0-9][0-9][0-9]-*.patch; do
    # GIT_CEILING_DIRECTORIES: no enclosing repository, so paths are the sdist tree's (this
    # checkout is one, and git apply inside it would skip paths outside its own tree)
    (cd "$WORK"/patched && GIT_CEILING_DIRECTORIES=$WORK git apply -p1 "$ROOT/$patch") || { echo "$patch does not apply to mergekit $MERGEKIT_VERSION" >&2; exit 1; }
    echo "applied $patch"
done
pip install --no-deps --force-reinstall "$WORK"/patched
"$VENV"/bin/python -c "import mergekit.plugins"

step "mergekit's suite, patched, with our plugin installed"
mergekit_suite "$WORK"/patched
step "our tests through the mergekit.plugins entry point"
our_plugin_tests

step "upstream check passed"
