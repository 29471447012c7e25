//! Process limits: raise the open-files soft limit to the hard limit, so that thousands of
//! clients work without tuning (the usual soft limit, 1024, is one file per client).

/// Raises `RLIMIT_NOFILE`'s soft limit to its hard limit; returns `(before, after)`.
pub fn raise_open_files_limit() -> std::io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own; the resource constant is valid.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit reads the struct we own; raising the soft limit up to the hard
        // limit needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok((before, limit.rlim_cur))
}

/// Descriptors kept for everything but clients: the database connection, the listening
/// socket, connections still in their handshake, `/status` and `/metrics` requests, the log
/// file. A twentieth of the limit, at least 32 and at most 256.
pub fn reserved_descriptors(open_files_limit: u64) -> u64 {
    (open_files_limit / 20).clamp(32, 256)
}

/// How many clients fit under `open_files_limit` (one descriptor each) with the reserve kept.
pub fn client_capacity(open_files_limit: u64) -> usize {
    let capacity = open_files_limit.saturating_sub(reserved_descriptors(open_files_limit));
    usize::try_from(capacity.max(1)).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    #[test]
    fn clients_leave_headroom_below_the_limit() {
        assert_eq!(super::client_capacity(20_000), 19_744);
        assert_eq!(super::client_capacity(1024), 973);
        assert_eq!(super::client_capacity(64), 32);
        assert_eq!(super::client_capacity(10), 1);
    }

    #[test]
    fn soft_limit_reaches_the_hard_limit() {
        let (before, after) = super::raise_open_files_limit().expect("getrlimit works");
        assert!(after >= before);
        let (again, _) = super::raise_open_files_limit().expect("getrlimit works");
        assert_eq!(again, after);
    }
}
