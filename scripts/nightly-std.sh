# Sourced by the scripts that build for aarch64 targets: sets `nightly` (a nightly toolchain
# whose standard library can be built from source with -Zbuild-std) and `cache`, or calls
# `skip` (which the sourcing script defines) with the reason it cannot.
#
# The nightly is the one this machine's image carries; the library's sources are Debian's
# `rust-src` package of the same version, fetched with a private apt state and unpacked under
# ~/.cache/odmoe, so the system is never touched.

cache="${XDG_CACHE_HOME:-$HOME/.cache}/odmoe"
# The nightly toolchain, and the version of its standard library.
nightly=$(rustup toolchain list 2>/dev/null | awk '/^nightly/ {print $1; exit}')
[ -n "$nightly" ] || skip "no nightly toolchain (rustup toolchain list shows none)"
sysroot=$(rustc "+$nightly" --print sysroot)
release=$(rustc "+$nightly" -V | sed -E 's/^rustc ([0-9]+\.[0-9]+)\..*/\1/')
library="$sysroot/lib/rustlib/src/rust/library"

# The library's sources: Debian's rust-src of the same major.minor version.
if [ ! -f "$library/std/Cargo.toml" ]; then
  src="$cache/rust-src"
  if [ ! -f "$src/library/std/Cargo.toml" ]; then
    command -v apt-get >/dev/null || skip "no apt-get to fetch Debian's rust-src $release"
    apt="$cache/apt"
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian sid main" \
      >"$apt/sources.list"
    options=(-o "Dir::State::Lists=$apt/lists" -o "Dir::Etc::SourceList=$apt/sources.list"
      -o Dir::Etc::SourceParts=/dev/null -o "Dir::Cache=$apt/cache" -o Debug::NoLocking=1
      -o APT::Sandbox::User=root)
    apt-get "${options[@]}" update >/dev/null 2>&1 ||
      skip "Debian's package registry is unreachable (apt-get update failed)"
    candidate=$(apt-cache "${options[@]}" policy rust-src | awk '/Candidate:/ {print $2}')
    case "$candidate" in
      "$release".*) ;;
      *) skip "Debian unstable has rust-src ${candidate:-none}, the nightly is $release: versions drifted apart" ;;
    esac
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    (cd "$work" && apt-get "${options[@]}" download "rust-src=$candidate" >/dev/null 2>&1) ||
      skip "cannot download rust-src $candidate"
    dpkg -x "$work"/rust-src_*.deb "$work/x"
    rm -rf "$src.partial"
    mkdir -p "$src.partial"
    mv "$work"/x/usr/src/rustc-*/library "$src.partial/library"
    rm -rf "$src"
    mv "$src.partial" "$src"
    echo "rust-src $candidate unpacked in $src"
  fi
  mkdir -p "$(dirname "$library")"
  ln -sfn "$src/library" "$library"
fi
