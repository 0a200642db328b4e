#!/bin/sh
# Entrypoint of the Redis container (docker-compose.yml): renders deploy/redis-users.acl
# with the sha256 of COORDINATOR_REDIS_PASSWORD (Redis ACL files have no variables and no
# comments; the file holds the hash, never the password), then starts Redis through the
# image's own entrypoint with the arguments given.
set -eu
: "${COORDINATOR_REDIS_PASSWORD:?set COORDINATOR_REDIS_PASSWORD (e.g. openssl rand -hex 32)}"
template="${ACL_TEMPLATE:-/etc/redis/users.acl.in}"
rendered="${ACL_FILE:-/data/users.acl}"
hash=$(printf '%s' "$COORDINATOR_REDIS_PASSWORD" | sha256sum | cut -d' ' -f1)
umask 077
sed "s/@COORDINATOR_REDIS_PASSWORD_SHA256@/$hash/" "$template" > "$rendered"
exec docker-entrypoint.sh "$@"
