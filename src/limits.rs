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

#[cfg(test)]
mod tests {
    #[test]
    fn soft_limit_reaches_the_hard_limit() {
        let (before, after) = super::raise_open_files_limit().expect("getrlimit works");
        assert!(after >= before);
        let (again, _) = super::raise_open_files_limit().expect("getrlimit works");
        assert_eq!(again, after);
    }
}
