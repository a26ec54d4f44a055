#!/usr/bin/env bash
# Bringing an exported model back from a lent GPU machine, whose calls return at most 8 files of 16 MiB each
# (64 MiB in all; /work/.library/device/README.md): the export as one tar in 15 MiB parts, with their checksums.
#   there:  bash scripts/device_transfer.sh export RUN $OUT/NAME   # flowlm_jax.export RUN, then pack it
#           bash scripts/device_transfer.sh pack DIR $OUT/NAME     # any directory: NAME/NAME.tar.partNN + SHA256SUMS
#   here:   bash scripts/device_transfer.sh unpack FILES_AT/NAME models   # checked, then models/NAME
# A directory whose tar needs more than 7 parts (over ~100 MiB: more than one call brings back) is refused there.
set -euo pipefail
part_bytes=$((15 * 1024 * 1024))
max_parts=7  # the 8th file is SHA256SUMS
die() { echo "device_transfer: $*" >&2; exit 1; }

pack() {  # pack DIR DEST
  local src=${1%/} dest=$2 name
  name=$(basename "$src")
  [ -d "$src" ] || die "$src is not a directory"
  [ ! -e "$dest" ] || [ -z "$(ls -A "$dest")" ] || die "$dest exists and is not empty"
  local bytes parts
  bytes=$(du -sb "$src" | cut -f1)
  parts=$(( (bytes + part_bytes - 1) / part_bytes ))
  [ "$parts" -le "$max_parts" ] || die "$src is $((bytes >> 20)) MiB: more than $max_parts parts of 15 MiB"
  mkdir -p "$dest"
  tar -C "$(dirname "$src")" -cf - "$name" | split -b "$part_bytes" -d - "$dest/$name.tar.part"
  (cd "$dest" && sha256sum "$name".tar.part* > SHA256SUMS)
  # tar's headers can add a part to a directory just under a multiple of 15 MiB
  [ "$(ls "$dest" | wc -l)" -le 8 ] || die "$src packs into more than 8 files; bring it back in two calls"
  echo "packed $src into $dest: $(ls "$dest" | grep -c part) part(s), $((bytes >> 20)) MiB"
}

unpack() {  # unpack FILES DEST_PARENT
  local files=${1%/} parent=$2 name
  [ -f "$files/SHA256SUMS" ] || die "$files has no SHA256SUMS (not written by device_transfer.sh pack)"
  name=$(sed -n '1s/^[0-9a-f]*  \(.*\)\.tar\.part00$/\1/p' "$files/SHA256SUMS")
  [ -n "$name" ] || die "$files/SHA256SUMS does not start with a .tar.part00 line"
  (cd "$files" && sha256sum --quiet -c SHA256SUMS) || die "$files: a part is missing or damaged (SHA256SUMS)"
  [ "$(ls "$files"/"$name".tar.part* | wc -l)" = "$(wc -l < "$files/SHA256SUMS")" ] \
    || die "$files holds parts that SHA256SUMS does not list"
  [ ! -e "$parent/$name" ] || die "$parent/$name exists: move it away first"
  mkdir -p "$parent"
  local partial="$parent/.$name.partial"
  rm -rf "$partial" && mkdir "$partial"
  cat "$files/$name".tar.part* | tar -C "$partial" -xf -
  mv "$partial/$name" "$parent/$name" && rmdir "$partial"
  echo "unpacked $parent/$name"
}

case ${1:-} in
  pack) [ $# = 3 ] || die "usage: pack DIR DEST"; pack "$2" "$3" ;;
  unpack) [ $# = 3 ] || die "usage: unpack FILES DEST_PARENT"; unpack "$2" "$3" ;;
  export)
    [ $# = 3 ] || die "usage: export RUN DEST"
    staging=$(mktemp -d)
    trap 'rm -rf "$staging"' EXIT
    python3 -m flowlm_jax.export "$2" --out "$staging/$(basename "$3")"
    pack "$staging/$(basename "$3")" "$3" ;;
  *) die "usage: $0 export RUN DEST | pack DIR DEST | unpack FILES DEST_PARENT" ;;
esac
