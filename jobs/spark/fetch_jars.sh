#!/usr/bin/env bash
# Copy the Delta Lake jars for PySpark (see pom.xml beside this file) into .cache/jars/.
#
#   bash jobs/spark/fetch_jars.sh [OUTPUT_DIR]       (default: <repo>/.cache/jars)
#
# Idempotent: when the folder already holds the jars resolved from this very pom.xml (a stamp
# file records its checksum) it exits at once, without Maven. Otherwise Maven resolves them
# (through ~/.m2, so a second machine-local run downloads nothing) into a temporary folder that
# replaces the old one only when the copy is complete. Needs `mvn` and a JDK 17+.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="${1:-${FINFEAT_SPARK_JARS:-$repo/.cache/jars}}"
pom="$here/pom.xml"
stamp="$out/.pom.sha256"
want="$(sha256sum "$pom" | cut -d' ' -f1)"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] && compgen -G "$out/delta-spark_*.jar" >/dev/null; then
  exit 0
fi

command -v mvn >/dev/null || { echo "fetch_jars.sh: mvn not found; install Maven (apt-get install maven)" >&2; exit 1; }

mkdir -p "$(dirname "$out")"
tmp="$(mktemp -d "$(dirname "$out")/.jars.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
chmod 755 "$tmp"
copy=(dependency:copy-dependencies -DoutputDirectory="$tmp" -DincludeScope=runtime)
# From ~/.m2 alone when it already holds them (no network); otherwise from Maven Central.
mvn -q -B -o -f "$pom" "${copy[@]}" >/dev/null 2>&1 || mvn -q -B -f "$pom" "${copy[@]}"
compgen -G "$tmp/delta-spark_*.jar" >/dev/null || { echo "fetch_jars.sh: Maven copied no delta-spark jar" >&2; exit 1; }
echo "$want" > "$tmp/.pom.sha256"
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
echo "fetch_jars.sh: $(ls "$out"/*.jar | wc -l) jars ($(du -sh "$out" | cut -f1)) in $out"
