#!/usr/bin/env bash
# Validates the deployment files without a container runtime or a cluster: the compose file
# (docker-compose config), the Kubernetes manifests against the API schemas (kubernetes-validate,
# offline), the nginx and HAProxy configurations (nginx -t, haproxy -c). Installs the validators
# it needs. The test command runs it.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
missing=()
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v nginx >/dev/null 2>&1 || missing+=(nginx)
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
if [ ${#missing[@]} -gt 0 ]; then
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v kubernetes-validate >/dev/null 2>&1 || python3 -m pip install -q kubernetes-validate

echo "== docker-compose config"
docker-compose -f docker-compose.yml config -q

echo "== kubernetes-validate"
manifests=$(ls deploy/kubernetes/*.yaml | grep -v kustomization.yaml)
kubernetes-validate --strict -k 1.31.0 $manifests
# Every manifest is listed in the kustomization, and every listed one exists.
for m in $manifests; do
  grep -q "^  - $(basename "$m")$" deploy/kubernetes/kustomization.yaml \
    || { echo "$m is not in kustomization.yaml"; exit 1; }
done

echo "== kubernetes-validate: the TLS overlay (deploy/kubernetes/tls), patched as kustomize would"
overlay=$(mktemp -d)
python3 - deploy/kubernetes "$overlay" <<'PY'
import json, os, sys, yaml
base, out = sys.argv[1], sys.argv[2]
kustomization = yaml.safe_load(open(f"{base}/tls/kustomization.yaml"))
assert kustomization["resources"] == ["../"], kustomization["resources"]
files = {"Deployment": "deployment.yaml", "Service": "service.yaml"}
for patch in kustomization["patches"]:
    kind = patch["target"]["kind"]
    doc = yaml.safe_load(open(f"{base}/{files[kind]}"))
    assert doc["metadata"]["name"] == patch["target"]["name"]
    for op in json.load(open(f"{base}/tls/{patch['path']}")):
        *parents, last = op["path"].strip("/").split("/")
        node = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            if op["op"] == "add" and last == "-":
                node.append(op["value"])
            elif op["op"] == "add":
                node.insert(int(last), op["value"])
            else:
                assert int(last) < len(node), op
                node[int(last)] = op["value"]
        else:
            assert op["op"] == "add" or last in node, op
            node[last] = op["value"]
    yaml.safe_dump(doc, open(os.path.join(out, f"tls-{files[kind]}"), "w"))
PY
kubernetes-validate --strict -k 1.31.0 "$overlay"/tls-*.yaml
rm -rf "$overlay"

echo "== grafana dashboard"
python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); assert d["panels"], "no panels"' \
  deploy/grafana-dashboard.json

echo "== nginx -t"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
nginx -t -q -p "$tmp" -c "$PWD/deploy/nginx.conf" -g "pid $tmp/nginx.pid; error_log $tmp/error.log;"

echo "== haproxy -c"
SSEGATE_LB_BIND=127.0.0.1:8080 SSEGATE_NODE1=127.0.0.1:8081 SSEGATE_NODE2=127.0.0.1:8082 \
  SSEGATE_NODE3=127.0.0.1:8083 haproxy -c -q -f deploy/haproxy.cfg
SSEGATE_LB_BIND=127.0.0.1:8443 SSEGATE_NODE1=127.0.0.1:8081 SSEGATE_NODE2=127.0.0.1:8082 \
  SSEGATE_NODE3=127.0.0.1:8083 haproxy -c -q -f deploy/haproxy-tls.cfg

echo "deploy files: valid"
