#!/usr/bin/env bash
# The README's test command (the block after its "test-command" marker), each time in a fresh virtual
# environment, once per exact set: constraints.txt as written (the newest transformers pyproject.toml allows)
# and, with `-c constraints-oldest.txt` in its place, the oldest. First checks that the two sets pin the edges of
# pyproject.toml's transformers range. .ci/run runs this; so can anyone:
#
#     scripts/test_transformers_range.sh                          # both sets
#     scripts/test_transformers_range.sh constraints-oldest.txt   # one of them
#
# The environments live outside the repository, in a temporary folder removed at exit (set OBCACHE_VENVS to a
# folder to keep them there; each is still made afresh). PYTHON picks the interpreter (default python3). pip's
# own cache is reused between runs; PIP_NO_COMPILE=1 (unless set) skips byte-compiling what is installed,
# which halves the install time: Python compiles the modules the tests import.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}

command=$(awk '/<!-- test-command -->/{found=1; next} found && /^```/{if (inside) exit; inside=1; next} inside{print}' README.md)
if [ -z "$command" ] || [[ "$command" != *"-c constraints.txt"* ]]; then
    echo "$0: no test command with '-c constraints.txt' found in README.md" >&2
    exit 1
fi

# The two sets must pin the edges of pyproject.toml's transformers range: its lower bound, and a release of the
# minor just below its upper bound.
"$python" - <<'EOF'
import re
import sys

spec = re.search(r'"transformers>=([\d.]+),<([\d.]+)"', open("pyproject.toml").read())
if spec is None:
    sys.exit('pyproject.toml: no "transformers>=LOW,<HIGH" dependency')
low, high = spec.groups()
pins = {}
for path in ("constraints-oldest.txt", "constraints.txt"):
    pin = re.search(r"^transformers==([\d.]+)\s*$", open(path).read(), re.M)
    if pin is None:
        sys.exit(f"{path}: no transformers==X pin")
    pins[path] = pin.group(1)
version = lambda text: tuple(int(part) for part in text.split("."))
below = version(high)[:2]
errors = []
if pins["constraints-oldest.txt"] != low:
    errors.append(f"constraints-oldest.txt pins transformers {pins['constraints-oldest.txt']}, "
                  f"but pyproject.toml's lower bound is {low}")
newest = version(pins["constraints.txt"])
if not (newest < version(high) and len(below) == 2 and newest[:2] == (below[0], below[1] - 1)):
    errors.append(f"constraints.txt pins transformers {pins['constraints.txt']}, "
                  f"not a release of the newest minor below pyproject.toml's upper bound <{high}")
if errors:
    sys.exit("\n".join(errors))
print(f"transformers range >={low},<{high}: testing {pins['constraints-oldest.txt']} and {pins['constraints.txt']}")
EOF

sets=("$@")
[ ${#sets[@]} -gt 0 ] || sets=(constraints.txt constraints-oldest.txt)

root=${OBCACHE_VENVS:-}
if [ -z "$root" ]; then
    root=$(mktemp -d "${TMPDIR:-/tmp}/obcache-venvs.XXXXXX")
    trap 'rm -rf "$root"' EXIT
fi
mkdir -p "$root"
export PIP_NO_COMPILE=${PIP_NO_COMPILE:-1}

failed=()
summary=()
for set in "${sets[@]}"; do
    [ -f "$set" ] || { echo "$0: no constraints file $set" >&2; exit 1; }
    pinned=$(sed -n 's/^transformers==//p' "$set")
    venv="$root/transformers-$pinned"
    run=${command//-c constraints.txt/-c $set}
    echo "== transformers $pinned ($set), fresh environment $venv"
    echo "+ $run"
    start=$SECONDS
    rm -rf "$venv"
    if "$python" -m venv "$venv" && (source "$venv/bin/activate" && bash -euo pipefail -c "$run"); then
        summary+=("transformers $pinned ($set): passed in $((SECONDS - start)) s")
    else
        summary+=("transformers $pinned ($set): FAILED after $((SECONDS - start)) s")
        failed+=("$set")
    fi
done
printf '%s\n' "${summary[@]}"
[ ${#failed[@]} -eq 0 ]
