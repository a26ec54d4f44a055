#!/usr/bin/env bash
# Bringing an exported model back from a lent GPU machine, whose calls return at most 8 files of 16 MiB each
# and 64 MiB in all (/work/.library/device/README.md): the export as one tar in 15 MiB parts, with checksums.
#   there:  bash scripts/device_transfer.sh export RUN $OUT/NAME   # flowlm_jax.export RUN, then pack it
#           bash scripts/device_transfer.sh pack DIR $OUT/NAME     # any directory: NAME/NAME.tar.partNN + SHA256SUMS
#   here:   bash scripts/device_transfer.sh unpack FILES_AT/NAME models   # checked, then models/NAME
# A directory whose tar needs more than 4 parts (60 MiB: what one call brings back, beside a few logs) is refused
# there, before anything is written.
set -euo pipefail
part_bytes=$((15 * 1024 * 1024))
max_parts=4  # 60 MiB + SHA256SUMS: a call returns 64 MiB in all, logs included
die() { echo "device_transfer: $*" >&2; exit 1; }

pack() {  # pack DIR DEST
  local src=${1%/} dest=$2 name
  name=$(basename "$src")
  [ -d "$src" ] || die "$src is not a directory"
  [ ! -e "$dest" ] || [ -z "$(ls -A "$dest")" ] || die "$dest exists and is not empty"
  local bytes parts
  bytes=$(du -sb "$src" | cut -f1)  # an estimate (tar adds headers): the parts are counted again below
  [ $(( (bytes + part_bytes - 1) / part_bytes )) -le "$max_parts" ] \
    || die "$src is $((bytes >> 20)) MiB: more than $max_parts parts of 15 MiB, more than one call brings back"
  mkdir -p "$dest"
  tar -C "$(dirname "$src")" -cf - "$name" | split -b "$part_bytes" -d - "$dest/$name.tar.part"
  parts=$(ls "$dest"/"$name".tar.part* | wc -l)
  [ "$parts" -le "$max_parts" ] || { rm -rf "$dest"; die "$src packs into $parts parts: more than $max_parts"; }
  (cd "$dest" && sha256sum "$name".tar.part* > SHA256SUMS)
  echo "packed $src into $dest: $parts part(s), $((bytes >> 20)) MiB"
}

unpack() {  # unpack FILES DEST_PARENT
  local files=${1%/} parent=$2 name
  [ -f "$files/SHA256SUMS" ] || die "$files has no SHA256SUMS (not written by device_transfer.sh pack)"
  name=$(sed -n '1s/^[0-9a-f]*  \(.*\)\.tar\.part00$/\1/p' "$files/SHA256SUMS")
  [ -n "$name" ] || die "$files/SHA256SUMS does not start with a .tar.part00 line"
  (cd "$files" && sha256sum --quiet -c SHA256SUMS) || die "$files: a part is missing or damaged (SHA256SUMS)"
  [ "$(ls "$files"/"$name".tar.part* | wc -l)" -eq "$(wc -l < "$files/SHA256SUMS")" ] \
    || die "$files holds parts that SHA256SUMS does not list"
  [ ! -e "$parent/$name" ] || die "$parent/$name exists: move it away first"
  mkdir -p "$parent"
  partial="$parent/.$name.partial"  # whole or not at all: a failed extraction leaves no $parent/$name
  rm -rf "$partial" && mkdir "$partial"
  trap 'rm -rf "$partial"' EXIT
  cat "$files/$name".tar.part* | tar -C "$partial" -xf -
  mv "$partial/$name" "$parent/$name"
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
