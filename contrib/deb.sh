#!/bin/sh
# Build the Debian package (popgate_*.deb under the target dir's debian/) with cargo-deb
# (`cargo install cargo-deb`): release build, then the man pages (gzipped, as Debian policy
# wants) and shell completions that [package.metadata.deb] in Cargo.toml installs, generated
# by the binary itself, then `cargo deb --no-build` (extra arguments go to it).
#
# CARGO_TARGET_DIR is honoured like cargo does (default: target/). POPGATE_BIN and
# PACKAGING_DIR override the binary and the output directory of the generated files;
# GENERATE_ONLY=1 stops after generating them (tests/it/packaging.rs uses both).
set -eu
cd "$(dirname "$0")/.."

target=${CARGO_TARGET_DIR:-target}
bin=${POPGATE_BIN:-$target/release/popgate}
out=${PACKAGING_DIR:-$target/release/packaging}

if [ -z "${POPGATE_BIN:-}" ]; then
    cargo build --release --locked
fi
rm -rf "$out"
mkdir -p "$out/man" "$out/completions"
"$bin" man --dir "$out/man"
# -n: no name or time stamp in the .gz, so the package builds reproducibly.
gzip -9nf "$out"/man/*.1 "$out"/man/*.5
"$bin" completions bash >"$out/completions/popgate.bash"
"$bin" completions zsh >"$out/completions/_popgate"
"$bin" completions fish >"$out/completions/popgate.fish"
echo "generated man pages and completions in $out"

if [ "${GENERATE_ONLY:-0}" = 1 ]; then
    exit 0
fi
# cargo-deb reads assets under target/release/ from the real target dir (CARGO_TARGET_DIR).
cargo deb --no-build "$@"
