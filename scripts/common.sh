# shellcheck shell=bash
# Shared set-up for scripts/test and scripts/demo (sourced, not run).
# Target: a fresh Debian 12 as root. Idempotent: when everything is already
# installed it runs no apt-get at all and costs well under a second.

# shellcheck disable=SC2034 # used by the scripts that source this file
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MIN_RUST="1.85.0"

# What the project needs from Debian: Nix 2.8 (+ nixbld users and nix.conf
# from nix-setup-systemd), the executors' tools, and what cargo needs to build
# (C toolchain and headers for the -sys crates).
DEB_PACKAGES=(
  nix-bin nix-setup-systemd bubblewrap busybox-static openssh-server
  build-essential pkg-config ca-certificates curl git openssl util-linux procps
  iproute2 # the jail-loopback test reads `ip -d link`
  jq       # cargo's JSON output: where it put the binaries (cargo_build)
  libssl-dev zlib1g-dev # openssl-sys / libssh2-sys / libz-sys (the ssh2 crate)
  libseccomp-dev        # libseccomp-sys (the jail's system call filter)
)

# Where cargo puts its output: CARGO_TARGET_DIR, build.target-dir of a
# .cargo/config.toml, else target/ (never assume the last).
cargo_target_dir() {
  local d
  d="$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)" \
    && [ -n "$d" ] && [ "$d" != null ] || die "cargo metadata did not say where cargo builds"
  printf '%s\n' "$d"
}

# cargo_build ARGS...: `cargo build ARGS`, then BUILT[NAME] is the path of
# every executable (binary or example) it built or found fresh, as cargo
# reports it (so wherever the target directory and --target put it).
declare -A BUILT=()
cargo_build() {
  local json name path
  json="$(cargo build "$@" --message-format=json-render-diagnostics)" || return 1
  while IFS=$'\t' read -r name path; do
    BUILT["$name"]="$path"
  done < <(jq -r 'select(.reason == "compiler-artifact" and .executable != null)
                  | [.target.name, .executable] | @tsv' <<<"$json")
}

# built NAME: the path of executable NAME from the last cargo_build.
built() {
  [ -n "${BUILT[$1]:-}" ] && [ -x "${BUILT[$1]}" ] || die "cargo build did not produce $1"
  printf '%s\n' "${BUILT[$1]}"
}

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
die() { printf '\033[31merror:\033[0m %s\n' "$*" >&2; exit 1; }

require_root() {
  [ "$(id -u)" -eq 0 ] || die "run me as root (I install packages and use the Nix store as root)"
}

require_debian() {
  if [ -r /etc/os-release ]; then
    # shellcheck disable=SC1091
    . /etc/os-release
    if [ "${ID:-}" != debian ]; then
      echo "warning: written for Debian 12, this is ${PRETTY_NAME:-unknown}" >&2
    fi
  fi
}

deb_installed() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'
}

ensure_packages() {
  local missing=() p
  for p in "${DEB_PACKAGES[@]}"; do
    deb_installed "$p" || missing+=("$p")
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    echo "Debian packages: all present"
    return
  fi
  step "Installing missing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update || die "apt-get update failed"
  apt-get install -y --no-install-recommends "${missing[@]}" \
    || die "apt-get install ${missing[*]} failed"
}

version_ge() { # version_ge A B: A >= B
  [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]
}

ensure_rust() {
  # rustup installs into ~/.cargo/bin; make it visible to this script.
  if [ -d "$HOME/.cargo/bin" ]; then
    case ":$PATH:" in *":$HOME/.cargo/bin:"*) ;; *) PATH="$HOME/.cargo/bin:$PATH" ;; esac
    export PATH
  fi
  local have=""
  if command -v cargo >/dev/null 2>&1 && command -v rustc >/dev/null 2>&1; then
    have="$(rustc --version | awk '{print $2}')"
  fi
  if [ -z "$have" ] || ! version_ge "${have%%-*}" "$MIN_RUST"; then
    step "Installing Rust (need >= $MIN_RUST, have ${have:-none}) with rustup"
    if ! command -v rustup >/dev/null 2>&1; then
      # Debian 12's rustc (1.63) is too old; rustup is not packaged in Debian 12.
      local init
      init="$(mktemp)"
      curl --proto '=https' --tlsv1.2 -fsSL \
        https://static.rust-lang.org/rustup/dist/x86_64-unknown-linux-gnu/rustup-init -o "$init" \
        || die "cannot download rustup-init (no network?)"
      chmod +x "$init"
      "$init" -y --no-modify-path --profile minimal --default-toolchain stable \
        -c rustfmt -c clippy || die "rustup-init failed"
      rm -f "$init"
      PATH="$HOME/.cargo/bin:$PATH"
      export PATH
    else
      rustup toolchain install stable --profile minimal -c rustfmt -c clippy \
        || die "rustup toolchain install failed"
      rustup default stable >/dev/null
    fi
  fi
  if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    command -v rustup >/dev/null 2>&1 \
      || die "cargo fmt/clippy missing and no rustup to add them (install rustfmt and clippy for $(rustc --version))"
    step "Adding rustfmt and clippy"
    rustup component add rustfmt clippy || die "rustup component add failed"
  fi
  echo "Rust: $(rustc --version)"
}

ensure_nix_store() {
  command -v nix-store >/dev/null 2>&1 || die "nix-store not on PATH after installing nix-bin"
  getent group nixbld >/dev/null 2>&1 \
    || die "group nixbld missing (it comes with nix-setup-systemd: apt-get install --reinstall nix-setup-systemd)"
  getent group nixbld | awk -F: '$4 == "" {exit 1}' \
    || die "group nixbld has no members (apt-get install --reinstall nix-setup-systemd)"
  # Creates /nix/store and the database if this is the first use; no-op after.
  nix-store --init || die "nix-store --init failed"
  if [ ! -d /nix/store ] || [ ! -w /nix/store ]; then
    die "/nix/store missing or not writable"
  fi
  nix-instantiate --eval -E '1 + 1' >/dev/null || die "nix-instantiate cannot evaluate"
  echo "Nix: $(nix-store --version)"
}

ensure_all() {
  require_root
  require_debian
  ensure_packages
  ensure_rust
  ensure_nix_store
}
