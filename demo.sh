#!/usr/bin/env bash
# lamina's main job, end to end, on a fresh machine: install into .venv, build a small root filesystem
# from this host's own binaries, register it as a layer, stack a second layer on it, and export both
# checking that each exported stream hashes to its DiffID; then the image lifecycle: load the root
# filesystem as an image, run commands in it (runc), change a file in a container, commit, run the new
# image, save it as an OCI archive, load it back and list.
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q -e . --config-settings editable_mode=strict 2>&1 | { grep -v "^WARNING: Location" || true; } >&2
LAMINA=.venv/bin/lamina
# runc runs the containers; install it (Debian) when it is missing and we may.
if ! command -v runc >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "demo: installing runc" >&2
        DEBIAN_FRONTEND=noninteractive apt-get update -qq && apt-get install -y -qq --no-install-recommends runc >/dev/null
    else
        echo "demo: runc is needed (e.g. apt-get install runc)" >&2
        exit 1
    fi
fi
PYVENV=.venv/bin/python

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

# 4. The image lifecycle: a docker-archive made here from the root filesystem → load → run a command in
#    it → change a file in a container → commit → run the new image → save as an OCI archive → list.
$PYVENV - "$work/base.tar" "$work/image.tar" <<'PY'
import hashlib, io, json, sys, tarfile
from lamina.formats.oci import host_platform
layer = open(sys.argv[1], "rb").read()
diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
config = json.dumps({
    **{k: v for k, v in host_platform().to_json().items() if k in ("architecture", "os", "variant")},
    "created": "2026-01-01T00:00:00Z",
    "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
    "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    "history": [{"created": "2026-01-01T00:00:00Z", "created_by": "demo.sh"}],
}).encode()
config_name = hashlib.sha256(config).hexdigest() + ".json"
manifest = json.dumps([{"Config": config_name, "RepoTags": ["demo/base:1"], "Layers": ["layer.tar"]}]).encode()
with tarfile.open(sys.argv[2], "w") as t:
    for name, data in (("layer.tar", layer), (config_name, config), ("manifest.json", manifest)):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
PY
$LAMINA "${store[@]}" load -i "$work/image.tar"
echo "run in it:"
$LAMINA "${store[@]}" run --rm demo/base:1 cat /etc/os-release | sed 's/^/  /'
set +e
$LAMINA "${store[@]}" run --rm demo/base:1 sh -c 'exit 7'
code=$?
set -e
[ "$code" = 7 ] || { echo "MISMATCH: exit code $code, expected 7" >&2; exit 1; }
echo "exit code of sh -c 'exit 7': $code"

cid=$($LAMINA "${store[@]}" create --name demo-edit demo/base:1)
root=$($LAMINA "${store[@]}" mount demo-edit)
echo "changed in a container" > "$root/etc/motd"
rm "$root/etc/passwd"
$LAMINA "${store[@]}" umount demo-edit
echo "changes of container ${cid:0:12}:"
$LAMINA "${store[@]}" diff demo-edit | sed 's/^/  /'
new=$($LAMINA "${store[@]}" commit demo-edit demo/edited:1 -m "demo edit" --change 'ENV EDITED=yes')
$LAMINA "${store[@]}" rm demo-edit
echo "committed image: ${new:7:12}"
got=$($LAMINA "${store[@]}" run --rm demo/edited:1 sh -c 'cat /etc/motd; echo "EDITED=$EDITED"')
echo "$got" | sed 's/^/  /'
[ "$got" = "$(printf 'changed in a container\nEDITED=yes')" ] || { echo "MISMATCH: the new image lacks the edit" >&2; exit 1; }

$LAMINA "${store[@]}" save --format oci-archive -o "$work/edited.tar" demo/edited:1
$LAMINA "${store[@]}" rmi demo/edited:1
$LAMINA "${store[@]}" load -i "$work/edited.tar"
got=$($LAMINA "${store[@]}" images -q --no-trunc --filter reference=demo/edited)
[ "$got" = "$new" ] || { echo "MISMATCH: the image loaded back is $got, saved was $new" >&2; exit 1; }
$LAMINA "${store[@]}" images
$LAMINA "${store[@]}" history demo/edited:1
echo "demo: OK"
