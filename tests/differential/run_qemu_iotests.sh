#!/bin/bash
# usage: run_qemu_iotests.sh QEMU_IO_PROG FMT TEST...    e.g. run_qemu_iotests.sh /tmp/bin/qemu-io qcow2 026 046
# Runs QEMU 7.2's own qemu-iotests (from Debian's qemu source package) with qemu-io replaced by QEMU_IO_PROG;
# qemu-img and qemu-nbd stay the real ones.  The source is fetched into $QSRC (default: qsrc in the temp dir)
# on first use.  Exit 0: all passed; 1: some failed or did not run; 3: the source could not be fetched.
set -u
prog=$1 fmt=$2; shift 2
QSRC=${QSRC:-${TMPDIR:-/tmp}/qsrc}
dir="$QSRC/qemu-7.2.0/tests/qemu-iotests"
fetch() {
  command -v qemu-img >/dev/null || apt-get install -y qemu-utils >/dev/null
  mkdir -p "$QSRC" && cd "$QSRC" || return 1
  # deb-src lines for the Debian archives the machine already uses (sources.list or deb822 .sources files)
  local lst; lst=$(mktemp)
  { grep -h '^deb ' /etc/apt/sources.list 2>/dev/null | sed 's/^deb /deb-src /'
    for f in /etc/apt/sources.list.d/*.sources; do
      [ -f "$f" ] && awk '
        function out(  n, a, i) { if (u != "") { n = split(s, a, " "); for (i = 1; i <= n; i++) print "deb-src " u " " a[i] c }; u = "" }
        /^URIs:/ { u = $2 } /^Suites:/ { $1 = ""; s = $0 } /^Components:/ { $1 = ""; c = $0 }
        /^$/ { out() } END { out() }' "$f"
    done; } | grep -i debian > "$lst"
  local apt=(apt-get -o Dir::Etc::SourceList="$lst" -o Dir::Etc::SourceParts=/dev/null)
  "${apt[@]}" update >/dev/null 2>&1
  "${apt[@]}" source --download-only qemu >/dev/null 2>&1
  rm -f "$lst"
  ls qemu_7.2+dfsg.orig.tar.xz qemu_7.2+dfsg-*.debian.tar.xz >/dev/null 2>&1 || return 1
  tar xf qemu_7.2+dfsg.orig.tar.xz && tar xf qemu_7.2+dfsg-*.debian.tar.xz || return 1
  # Debian's patches, as the packaged qemu-img was built with them
  (cd qemu-7.2.0 && for p in $(grep -v '^#' ../debian/patches/series); do patch -p1 -s < "../debian/patches/$p" || true; done)
}
if [ ! -x "$dir/check" ]; then
  (fetch) && [ -x "$dir/check" ] || { echo "QEMU 7.2 source could not be fetched into $QSRC"; exit 3; }
fi
cd "$dir" || exit 3
# a private scratch dir: two runs at once must not share (and break) each other's images
scratch=$(mktemp -d); trap 'rm -rf "$scratch"' EXIT
# Real qemu-img times its LUKS key derivation with the thread's CPU time and gives up with "Unable to get
# accurate CPU usage" when a loaded machine charges it none: create/amend/convert (which creates its
# target) are run again then (their output is held back until a run did not fail that way); every other
# command runs as it is.
cat > "$scratch/qemu-img" <<'WRAP'
#!/usr/bin/env bash
case "${1:-}" in create|amend|convert) ;; *) exec /usr/bin/qemu-img "$@" ;; esac
d=$(mktemp -d); trap 'rm -rf "$d"' EXIT
for _ in $(seq 30); do
  /usr/bin/qemu-img "$@" >"$d/out" 2>"$d/err"; rc=$?
  grep -q 'Unable to get accurate CPU usage' "$d/err" || break
done
cat "$d/out"; cat "$d/err" >&2; exit $rc
WRAP
chmod +x "$scratch/qemu-img"
out=$(TEST_DIR=$scratch/test SOCK_DIR=$scratch/sock QEMU_PROG=/bin/true QSD_PROG=/bin/true QEMU_IMG_PROG=$scratch/qemu-img \
      QEMU_IO_PROG="$prog" QEMU_NBD_PROG=/usr/bin/qemu-nbd timeout 900 python3 ./check -"$fmt" "$@" 2>&1)
echo "$out" | grep -E '^(Not run|Failures|Passed|Some cases)' | cut -c1-300
[ -n "${IOTESTS_KEEP:-}" ] && mkdir -p "$IOTESTS_KEEP" && cp "$scratch"/test/*.out.bad "$IOTESTS_KEEP"/ 2>/dev/null
pass=$(echo "$out" | grep -oE 'Passed all [0-9]+' | grep -oE '[0-9]+')
fails=$(echo "$out" | sed -n 's/^Failures: //p' | wc -w)
notrun=$(echo "$out" | sed -n 's/^Not run: //p' | wc -w)   # a test that did not run did not pass
total=$#
[ -n "$pass" ] || pass=$((total - fails - notrun))
echo "iotests $fmt: $pass passed, $((total - pass)) failed"
[ "$pass" -eq "$total" ]
