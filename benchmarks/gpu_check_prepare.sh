#!/usr/bin/env bash
# Prepares, here, what benchmarks/gpu_check.sh needs on a bare GPU machine that has no network:
#  - .whl/: wheels of the Python packages its image lacks (Python 3.12, x86-64), at the versions
#    this checkout's venv is tested with, checked to need nothing that is neither carried nor there;
#  - data/gpu_check/: every 5th image of the real CIFAR-10 and every 5th FER2013 row (from
#    ../shared/data, xz), because the whole sets (142 + 75 MB) exceed the 64 MiB that travels.
# Both folders are git-ignored (.gitignore: /.whl/, /data/). Then it prints what will travel
# and the device tool's call. Idempotent: wheels already there are kept, other versions of the
# same packages removed (two versions stop the install there); --force-data redoes the subsets.
#
#   benchmarks/gpu_check_prepare.sh [--no-wheels] [--no-data] [--force-data]
set -u
set -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PY=${GPU_CHECK_PYTHON:-python3}
[[ -z ${GPU_CHECK_PYTHON:-} && -x .venv/bin/python ]] && PY=.venv/bin/python
WHEELS=${GPU_CHECK_WHEELS:-.whl}
DATA=data/gpu_check
SOURCE=${GPU_CHECK_SOURCE_DATA:-$ROOT/../shared/data}
# What the GPU image's package list (KINDS.md) says it holds; used to check the wheels' needs.
KINDS=${GPU_CHECK_KINDS_MD:-/work/.library/device/KINDS.md}
# Missing there (KINDS.md, 2026-11-17): the CLI's jsonargparse[signatures], the sweep's optuna
# (the test collection imports it), opcheck's expecttest, and their needs. typing-extensions
# travels too: alembic needs >= 4.12, and the image's version is not listed.
PACKAGES=(jsonargparse docstring-parser typeshed-client optuna alembic sqlalchemy mako colorlog expecttest typing-extensions)

do_wheels=1 do_data=1 force_data=0
for arg in "$@"; do
    case $arg in
    --no-wheels) do_wheels=0 ;;
    --no-data) do_data=0 ;;
    --force-data) force_data=1 ;;
    *)
        echo "usage: $0 [--no-wheels] [--no-data] [--force-data]" >&2
        exit 2
        ;;
    esac
done
status=0

if ((do_wheels)); then
    # Pin each package to the version installed here (the one the test suite runs with).
    mapfile -t specs < <("$PY" - "${PACKAGES[@]}" <<'EOF'
import sys
from importlib import metadata
for name in sys.argv[1:]:
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(name)
EOF
    )
    echo "wheels: ${specs[*]}"
    mkdir -p "$WHEELS"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHEELS" "${specs[@]}" || status=1
    # One version per package, every need met by a wheel or by the image.
    "$PY" - "$WHEELS" "$KINDS" "${specs[@]}" <<'EOF' || status=1
import re
import sys
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

folder, kinds, specs = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
pins = {canonicalize_name(s.split("==")[0]): s.split("==")[1] for s in specs if "==" in s}
wheels = {}
for path in sorted(folder.glob("*.whl")):
    name, version, _, _ = parse_wheel_filename(path.name)
    if name in pins and str(version) != pins[name]:
        print(f"removed {path.name}: this checkout uses {name}=={pins[name]}")
        path.unlink()
        continue
    wheels.setdefault(name, []).append(path)
problems = [f"two versions of {n}: {[p.name for p in ps]}" for n, ps in wheels.items() if len(ps) > 1]
image = set()
if kinds.is_file():
    line = next((l for l in kinds.read_text().splitlines() if l.startswith("nvidia-h200: their image")), "")
    image = {canonicalize_name(n) for n in re.split(r",\s*", line.split("Packages:", 1)[-1].strip(" .")) if n}
environment = dict(default_environment(), python_version="3.12", python_full_version="3.12.3",
                   sys_platform="linux", platform_system="Linux", platform_machine="x86_64", extra="")
# jsonargparse is wanted with its "signatures" extra (LightningCLI).
extras = {"jsonargparse": {"signatures"}}
for name, paths in sorted(wheels.items()):
    with zipfile.ZipFile(paths[0]) as wheel:
        meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        requires = [l.split(":", 1)[1].strip() for l in wheel.read(meta).decode().splitlines() if l.startswith("Requires-Dist:")]
    for text in requires:
        requirement = Requirement(text)
        wanted = not requirement.marker or any(
            requirement.marker.evaluate(dict(environment, extra=e)) for e in extras.get(name, set()) | {""}
        )
        need = canonicalize_name(requirement.name)
        if wanted and need not in wheels and need not in image:
            problems.append(f"{name} needs {text}: neither carried nor in the image's list" + ("" if image else f" ({kinds} not read)"))
print(f"wheels: {len(wheels)} packages in {folder}, {sum(p.stat().st_size for ps in wheels.values() for p in ps) / 2**20:.1f} MiB")
for problem in problems:
    print(f"wheels: PROBLEM: {problem}")
sys.exit(1 if problems else 0)
EOF
fi

if ((do_data)); then
    if [[ -f $DATA/cifar-10-batches-py.tar.xz && -f $DATA/fer2013.csv.xz && $force_data == 0 ]]; then
        echo "data: $DATA already there (--force-data remakes it)"
    elif [[ -f $SOURCE/cifar-10-batches-py.tar.xz && -f $SOURCE/fer2013.csv.xz ]]; then
        echo "data: subsets of $SOURCE into $DATA (a few minutes: xz)"
        "$PY" benchmarks/gpu_check_util.py subset --source "$SOURCE" --dest "$DATA" \
            --cifar-stride "${GPU_CHECK_CIFAR_STRIDE:-5}" --fer-stride "${GPU_CHECK_FER_STRIDE:-5}" || status=1
    else
        echo "data: no real data at $SOURCE: the GPU fits will use generated data"
    fi
fi

# What travels: tracked and untracked-not-ignored files, plus the carried folders (limit 64 MiB).
tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f1)
carried=$(du -cb "$WHEELS" "$DATA" 2>/dev/null | tail -n 1 | cut -f1)
total=$((${tree:-0} + ${carried:-0}))
echo "travels: $((total / 1048576)) MiB (tree $((${tree:-0} / 1048576)) MiB, .whl + data/gpu_check $((${carried:-0} / 1048576)) MiB; limit 64 MiB)"
if ((total > 62 * 1048576)); then
    echo "travels: too close to the 64 MiB limit: use larger GPU_CHECK_CIFAR_STRIDE / GPU_CHECK_FER_STRIDE with --force-data" >&2
    status=1
fi
cat <<'EOF'
device tool call:
  run(command="GPU_CHECK_ARCHIVE=$OUT/gpu_check.tar.gz bash benchmarks/gpu_check.sh /tmp/gpu_check; rc=$?; cp /tmp/gpu_check/summary.txt $OUT/; exit $rc",
      carry=[".whl", "data/gpu_check"], timeout_s=540)
EOF
exit $status
