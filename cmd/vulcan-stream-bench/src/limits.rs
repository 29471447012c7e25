//! The limits that cap how many connections one machine holds, read before a large run so that
//! a run too big for them is planned down and says which limit stopped it, rather than failing
//! half-way through connecting.

use std::io;

/// What this machine and this process allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLimits {
    /// This process's open-files limit (its soft limit, raised to the hard limit at start).
    pub open_files: u64,
    /// `fs.file-max`: descriptors the whole machine may open.
    pub file_max: u64,
    /// Descriptors open machine-wide now (`fs.file-nr`).
    pub files_in_use: u64,
    /// `net.ipv4.ip_local_port_range`: the ephemeral ports, the most connections one local
    /// address can have to one server address and port.
    pub ports: (u32, u32),
    /// `MemAvailable` of `/proc/meminfo`.
    pub mem_available_kib: u64,
}

impl HostLimits {
    /// Reads the limits; what cannot be read counts as unlimited.
    pub fn read() -> HostLimits {
        let sysctl = |name: &str| std::fs::read_to_string(format!("/proc/sys/{name}")).ok();
        let first = |text: Option<String>| {
            text.and_then(|t| t.split_whitespace().next().and_then(|v| v.parse().ok()))
        };
        let ports = sysctl("net/ipv4/ip_local_port_range")
            .and_then(|t| parse_pair(&t))
            .unwrap_or((32768, 60999));
        HostLimits {
            open_files: own_open_files().unwrap_or(u64::MAX),
            file_max: first(sysctl("fs/file-max")).unwrap_or(u64::MAX),
            files_in_use: first(sysctl("fs/file-nr")).unwrap_or(0),
            ports,
            mem_available_kib: std::fs::read_to_string("/proc/meminfo")
                .ok()
                .and_then(|t| parse_mem_available(&t))
                .unwrap_or(u64::MAX),
        }
    }

    /// How many ephemeral ports there are.
    pub fn port_count(&self) -> u64 {
        u64::from(self.ports.1.saturating_sub(self.ports.0)) + 1
    }

    /// Descriptors the machine can still open.
    pub fn files_free(&self) -> u64 {
        self.file_max.saturating_sub(self.files_in_use)
    }
}

/// This process's open-files soft limit.
fn own_open_files() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own; the resource constant is valid.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit.rlim_cur)
}

/// Another process's open-files soft limit, from `/proc/<pid>/limits`.
pub fn process_open_files(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    parse_open_files(&text)
}

/// How many clients a vulcan-stream process whose open-files limit is `limit` admits: it keeps a
/// twentieth of the limit (32 to 256 descriptors) for everything but clients and lowers its
/// MaxClients to the rest (the server's `limits::client_capacity`; the generator does not link
/// the server, so the rule is repeated here).
pub fn server_capacity(limit: u64) -> u64 {
    limit.saturating_sub((limit / 20).clamp(32, 256)).max(1)
}

fn parse_open_files(limits: &str) -> Option<u64> {
    // "Max open files            20000                20000                files"
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line["Max open files".len()..].split_whitespace().next()?;
    match soft {
        "unlimited" => Some(u64::MAX),
        soft => soft.parse().ok(),
    }
}

fn parse_pair(text: &str) -> Option<(u32, u32)> {
    let mut values = text.split_whitespace().map(|v| v.parse().ok());
    Some((values.next()??, values.next()??))
}

fn parse_mem_available(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemAvailable:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max cpu time              unlimited            unlimited            seconds\n\
                      Max open files            20000                20000                files\n";
        assert_eq!(parse_open_files(limits), Some(20_000));
        assert_eq!(
            parse_open_files("Max open files            unlimited            unlimited  files"),
            Some(u64::MAX)
        );
        assert_eq!(parse_pair("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(
            parse_mem_available("MemTotal: 100 kB\nMemAvailable:   22335 kB\n"),
            Some(22335)
        );
    }

    #[test]
    fn server_capacity_matches_the_servers_rule() {
        assert_eq!(server_capacity(20_000), 19_744);
        assert_eq!(server_capacity(1024), 973);
        assert_eq!(server_capacity(64), 32);
    }

    #[test]
    fn reads_this_machine() {
        let host = HostLimits::read();
        assert!(host.open_files > 0);
        assert!(host.port_count() > 1000);
        assert!(host.files_free() > 0);
        assert!(process_open_files(std::process::id()).is_some());
    }
}
