#!/usr/bin/env bash
# lamina's main job, end to end, on a fresh machine: install into .venv, build a small root filesystem
# from this host's own binaries, register it as a layer, stack a second layer on it, and export both
# checking that each exported stream hashes to its DiffID; then make an image of the root filesystem,
# save it as an OCI archive, delete it, load it back and check that every digest survived.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q -e . --config-settings editable_mode=strict 2>&1 | { grep -v "^WARNING: Location" || true; } >&2
LAMINA=.venv/bin/lamina

work=$(mktemp -d /tmp/lamina-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
store=(--root "$work/store" --runroot "$work/run" --driver "${LAMINA_DRIVER:-vfs}")

# 1. A root filesystem made of host binaries and the libraries they need.
rootfs="$work/rootfs"
mkdir -p "$rootfs"/{bin,etc,tmp}
for b in sh ls cat echo env; do
    src=$(type -P "$b")
    cp -L "$src" "$rootfs/bin/$b"
    ldd "$src" 2>/dev/null | grep -o '/[^ ]*' | while read -r lib; do
        mkdir -p "$rootfs$(dirname "$lib")"
        cp -Ln "$lib" "$rootfs$lib"
    done
done
printf 'NAME="lamina demo"\nID=lamina-demo\n' > "$rootfs/etc/os-release"
echo 'root:x:0:0:root:/root:/bin/sh' > "$rootfs/etc/passwd"
tar --numeric-owner -C "$rootfs" -cf "$work/base.tar" .

# 2. Register it, then a second layer that adds, changes and deletes files.
base=$($LAMINA "${store[@]}" layer add "$work/base.tar")
echo "base layer:  $base"
mkdir -p "$work/l2/etc"
printf 'NAME="lamina demo"\nID=lamina-demo\nVERSION=2\n' > "$work/l2/etc/os-release"
echo hello > "$work/l2/etc/motd"
: > "$work/l2/etc/.wh.passwd"
tar --numeric-owner -C "$work/l2" -czf "$work/top.tar.gz" .
top=$($LAMINA "${store[@]}" layer add --parent "$base" "$work/top.tar.gz")
echo "top layer:   $top"
echo "changes of the top layer:"
$LAMINA "${store[@]}" layer diff "$top" | sed 's/^/  /'

# 3. Export both: each stream must hash to the layer's DiffID.
for chain in "$base" "$top"; do
    diff_id=$($LAMINA "${store[@]}" layers --format json |
        .venv/bin/python -c 'import json,sys; c=sys.argv[1]; print(next(l["diff_id"] for l in json.load(sys.stdin) if l["chain_id"]==c))' "$chain")
    $LAMINA "${store[@]}" layer export "$chain" -o "$work/out.tar"
    got="sha256:$(sha256sum "$work/out.tar" | cut -d' ' -f1)"
    if [ "$got" != "$diff_id" ]; then
        echo "MISMATCH: export of $chain hashes to $got, DiffID is $diff_id" >&2
        exit 1
    fi
    echo "export of ${chain:7:12} matches its DiffID ${diff_id:7:12}"
done
$LAMINA "${store[@]}" layers

# 4. Images: import the root filesystem as an image, save it as an OCI archive, remove it, load it back.
id=$($LAMINA "${store[@]}" import "$work/base.tar" demo/base:1 --change 'CMD ["/bin/sh"]' --change 'ENV GREETING=hello' -m "demo import")
echo "imported image: ${id:7:12}"
$LAMINA "${store[@]}" tag demo/base:1 demo/base:latest
$LAMINA "${store[@]}" save --format oci-archive -o "$work/image.tar" demo/base:1
$LAMINA "${store[@]}" rmi demo/base:1 demo/base:latest
$LAMINA "${store[@]}" load -i "$work/image.tar"
got=$($LAMINA "${store[@]}" images -q --no-trunc)
if [ "$got" != "$id" ]; then
    echo "MISMATCH: the image loaded back is $got, saved was $id" >&2
    exit 1
fi
$LAMINA "${store[@]}" images
$LAMINA "${store[@]}" history demo/base:1
echo "demo: OK"
