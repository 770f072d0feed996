#!/usr/bin/env bash
# Checks the Kubernetes example in deploy/k8s without a cluster:
#
#   bash tests/k8s_example.sh
#
#   1. `kubectl kustomize` renders it, with a certificate made for the check
#      (the example's secretGenerator reads deploy/k8s/certs/, git-ignored);
#   2. kubernetes-validate (from PyPI, installed into target/k8s-venv when
#      missing; it carries the Kubernetes OpenAPI schemas) validates every
#      rendered object with --strict (unknown fields are errors) for
#      Kubernetes $K8S_VERSION (default 1.32.0);
#   3. the portal loads the rendered ConfigMap's portal.yaml with the rendered
#      Secret's certificate and key, as the pod would mount them
#      (`portal check`): with $PORTAL, else target/release/portal, else the
#      image localhost/portal:latest (tests/container.sh builds it).
#
# Needs kubectl (for kustomize) and python3 with venv.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
K8S_VERSION=${K8S_VERSION:-1.32.0}
VENV=$REPO/target/k8s-venv

fail() {
    printf '\nFAIL: %s\n' "$*" >&2
    exit 1
}
show() {
    printf '   $ %s\n' "$*"
    "$@" 2>&1 | sed 's/^/     /'
    return "${PIPESTATUS[0]}"
}

command -v kubectl >/dev/null 2>&1 || fail "needs kubectl (kubectl kustomize renders the example)"
if [ ! -x "$VENV/bin/kubernetes-validate" ]; then
    echo "== installing kubernetes-validate into $VENV (pip)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q kubernetes-validate
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# portal ARGS...: the portal binary, or the image (as root, $WORK mounted at
# the same path).
if [ -n "${PORTAL:-}" ] || [ -x target/release/portal ]; then
    PORTAL_CMD=("${PORTAL:-$REPO/target/release/portal}")
elif command -v podman >/dev/null 2>&1 && podman image exists localhost/portal:latest; then
    printf '[containers]\ndefault_ulimits = []\n' >"$WORK/containers.conf"
    export CONTAINERS_CONF=$WORK/containers.conf
    PORTAL_CMD=(podman --runtime runc --cgroup-manager cgroupfs run --rm --user 0:0 --network none
        -v "$WORK:$WORK" localhost/portal:latest)
else
    fail "no portal: set PORTAL, build target/release/portal, or run tests/container.sh images"
fi

echo "== 1. kubectl kustomize deploy/k8s (with a certificate made for the check)"
cp -r deploy/k8s "$WORK/k8s"
rm -rf "$WORK/k8s/certs"
"${PORTAL_CMD[@]}" certs init --dir "$WORK/k8s/certs" --host portal --host portal.default.svc >/dev/null
show kubectl kustomize "$WORK/k8s" -o "$WORK/rendered.yaml" || fail "kubectl kustomize failed"
grep -E '^  (kind|name):|^kind:|^  name:' "$WORK/rendered.yaml" | paste - - | sed 's/^/     /' || true

echo "== 2. kubernetes-validate --strict -k $K8S_VERSION"
show "$VENV/bin/kubernetes-validate" --strict -k "$K8S_VERSION" "$WORK/rendered.yaml" ||
    fail "kubernetes-validate found errors"

echo "== 3. portal check of the rendered ConfigMap's portal.yaml, with the rendered Secret"
mkdir -p "$WORK/etc/portal/tls"
"$VENV/bin/python" - "$WORK/rendered.yaml" "$WORK/etc/portal" <<'PY'
import base64, pathlib, sys, yaml
docs = list(yaml.safe_load_all(open(sys.argv[1])))
out = pathlib.Path(sys.argv[2])
kinds = {(d["kind"], d["metadata"]["name"].rsplit("-", 1)[0]): d for d in docs}
sts = kinds[("StatefulSet", "redis")]
volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volumes["config"]["configMap"]["name"])
secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == volumes["tls"]["secret"]["secretName"])
assert secret["type"] == "kubernetes.io/tls", secret["type"]
(out / "portal.yaml").write_text(cm["data"]["portal.yaml"])
for key in ("tls.crt", "tls.key"):
    (out / "tls" / key).write_bytes(base64.b64decode(secret["data"][key]))
print("     the StatefulSet mounts ConfigMap %s and Secret %s (%s)" % (
    cm["metadata"]["name"], secret["metadata"]["name"], secret["type"]))
PY
show "${PORTAL_CMD[@]}" check -c "$WORK/etc/portal/portal.yaml" || fail "portal check refused the ConfigMap's portal.yaml"
echo
echo "PASS: deploy/k8s renders, validates against the Kubernetes $K8S_VERSION schemas, and its portal.yaml loads"
