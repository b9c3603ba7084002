# shellcheck shell=bash
# Helpers shared by scripts/test.sh and scripts/install.sh. Sourced, never run.
# Kept in one place so "where is cargo under sudo" and "is systemd PID 1" are
# answered the same way everywhere.

# True when systemd is the init system. Both checks are needed: /run/systemd/system
# is what sd_booted(3) tests, but a container can have it bind-mounted from the host
# while PID 1 is something else (docker-init, a sandbox agent); then systemctl would
# talk to nothing.
systemd_is_pid1() {
	[[ -d /run/systemd/system ]] && [[ "$(cat /proc/1/comm 2>/dev/null)" == systemd ]]
}

# Make `cargo` resolvable. `sudo` resets PATH (secure_path), so a rustup install in
# the invoking user's home or in /root is not on it. When we borrow the sudo user's
# rustup proxies we must also point RUSTUP_HOME at their toolchains, or the proxy
# looks in /root/.rustup and fails with "no default toolchain". CARGO_HOME stays
# root's so we never write root-owned files into the user's ~/.cargo.
ensure_cargo() {
	if command -v cargo >/dev/null 2>&1; then
		return 0
	fi
	local sudo_home=""
	if [[ -n "${SUDO_USER:-}" && "${SUDO_USER}" != root ]]; then
		sudo_home="$(getent passwd "$SUDO_USER" | cut -d: -f6)"
	fi
	local dir
	for dir in ${sudo_home:+"$sudo_home/.cargo/bin"} "${HOME:-/root}/.cargo/bin" /root/.cargo/bin /usr/local/cargo/bin; do
		if [[ -x "$dir/cargo" ]]; then
			PATH="$dir:$PATH"
			export PATH
			if [[ -n "$sudo_home" && "$dir" == "$sudo_home/.cargo/bin" && -z "${RUSTUP_HOME:-}" && -d "$sudo_home/.rustup" ]]; then
				export RUSTUP_HOME="$sudo_home/.rustup"
			fi
			return 0
		fi
	done
	printf 'error: cargo not found on PATH nor in ~/.cargo/bin, /root/.cargo/bin, /usr/local/cargo/bin.\n' >&2
	printf '       Install Rust (rust-version in Cargo.toml; Debian 12'"'"'s rustc is too old), e.g. with rustup.\n' >&2
	return 1
}

# Running as root through sudo leaves target/ owned by root, and the user's next plain
# `cargo build` then fails with "Permission denied". Hand target/ back to the user, but
# only when the checkout itself belongs to them (never chown a root-owned tree away).
return_target_to_sudo_user() {
	local repo=$1
	[[ -n "${SUDO_UID:-}" && -n "${SUDO_GID:-}" && "${SUDO_UID}" != 0 ]] || return 0
	[[ -d "$repo/target" ]] || return 0
	[[ "$(stat -c %u "$repo")" == "$SUDO_UID" ]] || return 0
	chown -R "$SUDO_UID:$SUDO_GID" "$repo/target" || true
}
