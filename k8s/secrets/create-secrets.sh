#!/usr/bin/env sh
# Create the platform's Secrets in the namespace with fresh random values (hex,
# so they are URL-safe). Existing Secrets are left alone, so it is safe to re-run;
# the values never touch the disk or the repository.
#   usage: k8s/secrets/create-secrets.sh [NAMESPACE]
set -eu
ns="${1:-motioncharacter}"
kubectl="${KUBECTL:-kubectl}"
rand() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }

create() {  # name key=value...
  name="$1"; shift
  if "$kubectl" -n "$ns" get secret "$name" >/dev/null 2>&1; then
    echo "secret/$name exists, left unchanged"
    return
  fi
  # values go through stdin, never onto a command line
  printf '%s\n' "$@" | "$kubectl" -n "$ns" create secret generic "$name" --from-env-file=/dev/stdin >/dev/null
  echo "secret/$name created"
}

"$kubectl" get namespace "$ns" >/dev/null 2>&1 || "$kubectl" create namespace "$ns"
create minio-root "MINIO_ROOT_USER=root-$(rand 4)" "MINIO_ROOT_PASSWORD=$(rand 24)"
# one object-store user per workload, each with its own MinIO policy (k8s/base/minio.yaml)
for workload in triton mlflow training pipeline; do
  create "s3-$workload" "AWS_ACCESS_KEY_ID=$workload-$(rand 8)" "AWS_SECRET_ACCESS_KEY=$(rand 24)"
done
create mlflow-db "POSTGRES_USER=mlflow" "POSTGRES_PASSWORD=$(rand 24)" "POSTGRES_DB=mlflow"
# MLflow's basic-auth admin (server only) and the user the platform's clients log in as
create mlflow-admin "MLFLOW_TRACKING_USERNAME=admin-$(rand 4)" "MLFLOW_TRACKING_PASSWORD=$(rand 24)" \
  "MLFLOW_FLASK_SERVER_SECRET_KEY=$(rand 32)"
create mlflow-client "MLFLOW_TRACKING_USERNAME=motioncharacter" "MLFLOW_TRACKING_PASSWORD=$(rand 24)"
# the key of Triton's restricted admin APIs (every Triton pod; `deploy --url` sends it)
create triton-admin "MOTIONCHARACTER_TRITON_ADMIN_KEY=$(rand 24)"
# the web page's login (k8s/components/ui), user:password; read it back with
# kubectl -n NS get secret ui-auth -o jsonpath='{.data.MOTIONCHARACTER_UI_AUTH}' | base64 -d
create ui-auth "MOTIONCHARACTER_UI_AUTH=motioncharacter:$(rand 16)"
