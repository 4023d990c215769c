#!/usr/bin/env bash
# Builds the OpenSearch test node (TestNode.java + the server and module jars from Maven
# Central) once per OpenSearch version into a cache, and skips when that build is present:
#
#   ${MONSOON_OPENSEARCH_CACHE:-$HOME/.cache/monsoon/opensearch}/<version>/
#     lib/*.jar        the node and every jar it needs (no distribution tarball)
#     classpath        those jars in a fixed order (the class-data archive is tied to it)
#     node.jsa         class-data archive of a first start (AppCDS: halves the start time)
#     bin/opensearch-node --home DIR --http-port PORT [-Ekey=value ...]
#                      exec's java; prints "monsoon-opensearch ready <url>" when serving,
#                      stops cleanly on SIGTERM. MONSOON_OPENSEARCH_JAVA_OPTS adds JVM flags.
#     .stamp           hash of the sources it was built from (a change rebuilds)
#
# Needs Java 11+ (17 here: OpenSearch 2.19.6 is the newest that runs on it) and Maven
# with Maven Central. Maven's own cache (~/.m2) is used as usual.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
version=$(sed -n 's:.*<opensearch.version>\(.*\)</opensearch.version>.*:\1:p' "$here/pom.xml" | sed -n 1p)
[ -n "$version" ] || { echo "build.sh: no <opensearch.version> in $here/pom.xml" >&2; exit 1; }
cache=${MONSOON_OPENSEARCH_CACHE:-$HOME/.cache/monsoon/opensearch}
dest=$cache/$version
# The sources and the JVM (the class-data archive is only valid for the JVM that made it).
stamp=$( (cd "$here" && cat build.sh pom.xml $(find src -type f | LC_ALL=C sort); java -version 2>&1 || true) | sha256sum | cut -c1-16)

if [ -f "$dest/.stamp" ] && [ "$(cat "$dest/.stamp")" = "$stamp" ]; then
    echo "opensearch $version: up to date in $dest"
    exit 0
fi

for tool in java mvn; do
    command -v "$tool" >/dev/null || { echo "build.sh: \`$tool\` not found: install Java 17 and Maven (apt-get install openjdk-17-jdk-headless maven)" >&2; exit 1; }
done

mkdir -p "$cache"
# One build at a time per cache (two `make test` runs on one machine).
exec 9>"$cache/.lock"
flock 9
if [ -f "$dest/.stamp" ] && [ "$(cat "$dest/.stamp")" = "$stamp" ]; then
    echo "opensearch $version: up to date in $dest"
    exit 0
fi

started=$(date +%s)
work=$(mktemp -d "$cache/.build.XXXXXX")
node_pid=
cleanup() {
    [ -n "$node_pid" ] && kill -KILL "$node_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

# Build out of the source tree (no target/ beside the sources).
cp -r "$here/pom.xml" "$here/src" "$work/"
echo "opensearch $version: building into $dest (a cold ~/.m2 downloads ~85 MB from Maven Central)"
if ! mvn -B -q -f "$work/pom.xml" package > "$work/mvn.log" 2>&1; then
    echo "build.sh: the Maven build failed:" >&2
    cat "$work/mvn.log" >&2
    exit 1
fi
out=$work/out
mkdir -p "$out/lib" "$out/bin"
cp "$work"/target/lib/*.jar "$work"/target/*.jar "$out/lib/"
(cd "$out/lib" && ls *.jar | LC_ALL=C sort | sed "s:^:$dest/lib/:" | paste -sd: -) > "$out/classpath"

cat > "$out/bin/opensearch-node" <<EOF
#!/bin/sh
# OpenSearch $version test node (built by tools/opensearch/build.sh). Small heap, serial GC and
# the C1 compiler only: tests want a quick start and little memory, not peak throughput.
dir=\$(cd "\$(dirname "\$0")/.." && pwd)
cds=
[ -f "\$dir/node.jsa" ] && cds="-XX:SharedArchiveFile=\$dir/node.jsa -Xlog:cds=off -Xlog:cds+dynamic=off"
exec java -Xms256m -Xmx512m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \$cds \\
    -Dfile.encoding=UTF-8 -Djava.awt.headless=true \\
    \${MONSOON_OPENSEARCH_JAVA_OPTS:-} \\
    -cp "\$(cat "\$dir/classpath")" dev.monsoon.opensearch.TestNode "\$@"
EOF
chmod +x "$out/bin/opensearch-node"

# Move into place, then record the classes a start loads (the archive is tied to the
# classpath, so it is made from the final location).
rm -rf "$dest"
mv "$out" "$dest"
home=$work/home
mkdir -p "$home"
MONSOON_OPENSEARCH_JAVA_OPTS="-XX:ArchiveClassesAtExit=$dest/node.jsa" \
    "$dest/bin/opensearch-node" --home "$home" --http-port 0 > "$work/node.log" 2>&1 &
node_pid=$!
url=
for _ in $(seq 1 1200); do
    url=$(sed -n 's/.*monsoon-opensearch ready \(http:[^ ]*\).*/\1/p' "$work/node.log")
    [ -n "$url" ] && break
    kill -0 "$node_pid" 2>/dev/null || break
    sleep 0.1
done
if [ -z "$url" ]; then
    echo "build.sh: the node did not start; its log:" >&2
    cat "$work/node.log" >&2
    exit 1
fi
if command -v curl >/dev/null; then
    # Load the classes of the requests the tests make, too.
    j='content-type: application/json'
    curl -sf -XPUT "$url/warmup" -H "$j" -d '{"settings":{"number_of_replicas":0},"mappings":{"properties":{"n":{"type":"long"}}}}' >/dev/null || true
    printf '%s\n' '{"index":{"_index":"warmup","_id":"1","version":2,"version_type":"external_gte"}}' '{"n":1,"s":"a b"}' \
        '{"delete":{"_index":"warmup","_id":"2","version":2,"version_type":"external_gte"}}' \
        '{"index":{"_index":"warmup","_id":"3"}}' '{"n":"x"}' |
        curl -sf -XPOST "$url/_bulk?refresh=true" -H 'content-type: application/x-ndjson' --data-binary @- >/dev/null || true
    curl -sf "$url/warmup/_search" -H "$j" -d '{"query":{"match":{"s":"a"}}}' >/dev/null || true
    curl -sf "$url/_mget" -H "$j" -d '{"docs":[{"_index":"warmup","_id":"1"}]}' >/dev/null || true
    curl -sf "$url/warmup/_count" >/dev/null || true
    curl -sf -XDELETE "$url/warmup" >/dev/null || true
fi
kill -TERM "$node_pid"
wait "$node_pid" || true
node_pid=
[ -f "$dest/node.jsa" ] || echo "build.sh: warning: no class-data archive made; the node starts slower" >&2
echo "$stamp" > "$dest/.stamp"
echo "opensearch $version: built in $(( $(date +%s) - started )) s: $dest ($(du -sh "$dest" | cut -f1))"
