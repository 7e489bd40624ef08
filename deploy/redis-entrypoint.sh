#!/bin/sh
# Redis for agentcard-broker replicas (deploy/compose.yaml, docs/deploy.md): writes the ACL file
# from the docker secrets, then starts Redis through the image's own entrypoint (which drops to
# the `redis` user). Runs as root: only root can read secret files owned by the broker's uid.
#
# Users (the file holds SHA-256 hashes, never a password):
#   broker   what every replica logs in as: its own keys (prefix `agentcard-broker:`, the
#            `store.prefix` of config.yaml) and only the commands the broker sends, Lua included
#   default  the administrator (redis-cli without --user): backups, INFO, ACL LOG
set -eu
umask 077

secret_hash() {
	value=$(tr -d '[:space:]' <"$1")
	if [ -z "$value" ]; then
		echo "redis-entrypoint: $1 is empty" >&2
		exit 1
	fi
	printf %s "$value" | sha256sum | cut -d' ' -f1
}

BROKER_HASH=$(secret_hash "${REDIS_PASSWORD_FILE:-/run/secrets/redis_password}")
ADMIN_HASH=$(secret_hash "${REDIS_ADMIN_PASSWORD_FILE:-/run/secrets/redis_admin_password}")
PREFIX=${BROKER_KEY_PREFIX:-agentcard-broker}
ACL=${REDIS_ACL_FILE:-/run/redis/users.acl}
# What the broker sends (broker/store/redis.py), inside its Lua scripts too: Redis checks those
# against the ACL as well. EVALSHA runs a script, SCRIPT LOAD loads it after a Redis restart. A
# command missing here shows in ACL LOG (one that may: CLIENT SETINFO, the client library naming
# itself on connect; it ignores the refusal).
BROKER_COMMANDS="+ping +time +exists +get +set +del +getdel +expire +pexpire"
BROKER_COMMANDS="$BROKER_COMMANDS +hset +hget +hgetall +hmget +hdel +hsetnx +hexists +hincrby"
BROKER_COMMANDS="$BROKER_COMMANDS +sadd +srem +sscan +smembers +scard"
BROKER_COMMANDS="$BROKER_COMMANDS +zadd +zrem +zrange +zrangebyscore +zremrangebyscore +zcard"
BROKER_COMMANDS="$BROKER_COMMANDS +eval +evalsha +script|load"

mkdir -p "$(dirname "$ACL")"
cat >"$ACL" <<ACL
user default on #$ADMIN_HASH ~* &* +@all
user broker on #$BROKER_HASH resetkeys ~$PREFIX:* resetchannels -@all $BROKER_COMMANDS
ACL
if [ "$(id -u)" = 0 ] && id redis >/dev/null 2>&1; then
	chown redis "$ACL"
fi

exec docker-entrypoint.sh redis-server \
	--aclfile "$ACL" \
	--appendonly yes \
	--appendfsync everysec \
	--maxmemory "${REDIS_MAXMEMORY:-256mb}" \
	--maxmemory-policy noeviction \
	"$@"
