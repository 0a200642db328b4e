#!/bin/sh
# Creates the Redis Cluster of docker-compose.yml's `cluster` profile from fresh nodes:
#
#   redis-cluster-create.sh HOST:PORT...      (REPLICAS=1: masters get one replica each)
#
# redis-cli splits the 16384 slots among the masters and makes each remaining node a
# replica. Does nothing when the first node already serves slots, so the one-shot service
# can run again after a restart. tests/test_redis_topologies.py runs this script against
# local nodes.
set -eu

if [ "$#" -eq 0 ]; then
    echo "usage: $0 HOST:PORT..." >&2
    exit 2
fi

first_host=${1%:*}
first_port=${1##*:}
assigned=$(redis-cli -h "$first_host" -p "$first_port" cluster info |
    tr -d '\r' | sed -n 's/^cluster_slots_assigned://p')
if [ "${assigned:-0}" != 0 ]; then
    echo "cluster already created ($assigned slots assigned on $1)"
    exit 0
fi

# CLUSTER MEET takes addresses, not names: resolve the service names first.
addresses=""
for node in "$@"; do
    host=${node%:*}
    port=${node##*:}
    address=$(getent hosts "$host" | awk '{ print $1; exit }')
    if [ -z "$address" ]; then
        echo "cannot resolve $host" >&2
        exit 1
    fi
    addresses="$addresses $address:$port"
done

# shellcheck disable=SC2086  # one argument per node
redis-cli --cluster create $addresses --cluster-replicas "${REPLICAS:-1}" --cluster-yes

# redis-cli returns once the nodes agree on the slots; wait until the first one serves.
tries=0
until redis-cli -h "$first_host" -p "$first_port" cluster info | grep -q '^cluster_state:ok'; do
    tries=$((tries + 1))
    if [ "$tries" -gt 300 ]; then
        echo "cluster_state is not ok after 30 s" >&2
        exit 1
    fi
    sleep 0.1
done
echo "cluster created: $*"
