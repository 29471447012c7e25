//! Resource use read from `/proc` and `getrusage`: a process's resident memory and CPU time,
//! the generator's own, and the whole machine's busy time.

use std::io;

use serde::{Deserialize, Serialize};

/// One reading of a process.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct ProcSample {
    /// `VmRSS` from `/proc/<pid>/status`.
    pub rss_kib: u64,
    /// `utime + stime` from `/proc/<pid>/stat`, in seconds (clock-tick resolution, 10 ms).
    pub cpu_s: f64,
}

/// Reads `pid`'s RSS and CPU time.
pub fn sample(pid: u32) -> io::Result<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    Ok(ProcSample {
        rss_kib: parse_vm_rss(&status).ok_or_else(|| invalid("no VmRSS line", pid))?,
        cpu_s: parse_cpu_ticks(&stat).ok_or_else(|| invalid("malformed stat", pid))? as f64
            / clock_ticks_per_second(),
    })
}

/// Whether `pid` names a live process.
pub fn exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}/stat")).exists()
}

/// The generator's own RSS and CPU time (user + system, microsecond resolution).
pub fn own() -> ProcSample {
    // SAFETY: getrusage writes into the zeroed struct we own; RUSAGE_SELF is valid.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let rss_kib = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| parse_vm_rss(&s))
        .unwrap_or(0);
    ProcSample {
        rss_kib,
        cpu_s: seconds(usage.ru_utime) + seconds(usage.ru_stime),
    }
}

/// The calling thread's CPU time (user + system) in seconds, from `/proc/thread-self/stat`
/// (clock-tick resolution, 10 ms).
pub fn own_thread_cpu_s() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    Some(parse_cpu_ticks(&stat)? as f64 / clock_ticks_per_second())
}

/// Busy and total CPU ticks of the whole machine, summed over its CPUs (`/proc/stat`).
#[derive(Debug, Clone, Copy, Default)]
pub struct MachineTicks {
    pub busy: u64,
    /// Interrupt and softirq time: loopback TCP is processed there, and no process is charged.
    pub irq: u64,
    pub total: u64,
}

pub fn machine() -> MachineTicks {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| parse_machine(&s))
        .unwrap_or_default()
}

/// The share of all CPUs that was busy between two readings, in percent.
pub fn busy_percent(before: MachineTicks, after: MachineTicks) -> f64 {
    share(
        before.total,
        after.total,
        after.busy.saturating_sub(before.busy),
    )
}

/// The share of all CPUs spent in interrupts and softirqs between two readings, in percent.
pub fn irq_percent(before: MachineTicks, after: MachineTicks) -> f64 {
    share(
        before.total,
        after.total,
        after.irq.saturating_sub(before.irq),
    )
}

fn share(total_before: u64, total_after: u64, part: u64) -> f64 {
    let total = total_after.saturating_sub(total_before);
    if total == 0 {
        return 0.0;
    }
    part as f64 * 100.0 / total as f64
}

/// The kernel's socket counts and TCP buffer memory (`/proc/net/sockstat`), machine-wide.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SockStat {
    /// `sockets: used`: sockets of every kind.
    pub sockets_used: u64,
    /// IPv4 TCP sockets in use (a loopback connection has two ends).
    pub tcp_inuse: u64,
    /// IPv6 TCP sockets in use (`/proc/net/sockstat6`): a dual-stack server's ends are IPv6
    /// sockets even for IPv4 clients.
    #[serde(default)]
    pub tcp6_inuse: u64,
    pub tcp_orphan: u64,
    pub tcp_tw: u64,
    /// TCP's `mem`: pages held for socket buffers, all TCP sockets together (IPv4 and IPv6).
    pub tcp_mem_pages: u64,
    pub page_size: u64,
}

impl SockStat {
    /// TCP sockets in use, IPv4 and IPv6.
    pub fn tcp_sockets(&self) -> u64 {
        self.tcp_inuse + self.tcp6_inuse
    }

    /// TCP buffer memory in KiB.
    pub fn tcp_mem_kib(&self) -> u64 {
        self.tcp_mem_pages * self.page_size / 1024
    }
}

/// Reads `/proc/net/sockstat` and `/proc/net/sockstat6`.
pub fn sockstat() -> io::Result<SockStat> {
    let text = std::fs::read_to_string("/proc/net/sockstat")?;
    let mut stat = parse_sockstat(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "/proc/net/sockstat: no TCP line",
        )
    })?;
    // Without IPv6 there is no sockstat6, and no IPv6 socket.
    if let Ok(text) = std::fs::read_to_string("/proc/net/sockstat6") {
        stat.tcp6_inuse = sockstat_field(&text, "TCP6:", "inuse").unwrap_or(0);
    }
    // SAFETY: sysconf has no preconditions.
    stat.page_size = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    Ok(stat)
}

/// The value of `name` on the line that starts with `prefix`: "TCP: inuse 14 orphan 0 tw 6
/// alloc 18 mem 263" has names and values in turn.
fn sockstat_field(text: &str, prefix: &str, name: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(prefix))?;
    let mut words = line.split_whitespace().skip(1);
    while let Some(word) = words.next() {
        let value = words.next()?;
        if word == name {
            return value.parse().ok();
        }
    }
    None
}

fn parse_sockstat(text: &str) -> Option<SockStat> {
    let tcp = |name| sockstat_field(text, "TCP:", name);
    Some(SockStat {
        sockets_used: sockstat_field(text, "sockets:", "used").unwrap_or(0),
        tcp_inuse: tcp("inuse")?,
        tcp6_inuse: 0,
        tcp_orphan: tcp("orphan").unwrap_or(0),
        tcp_tw: tcp("tw").unwrap_or(0),
        tcp_mem_pages: tcp("mem")?,
        page_size: 4096,
    })
}

fn invalid(what: &str, pid: u32) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("/proc/{pid}: {what}"))
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

/// `utime + stime` in clock ticks: fields 14 and 15, counted after the command name, which is
/// in parentheses and may itself contain spaces and parentheses.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_comm.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn parse_machine(stat: &str) -> Option<MachineTicks> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let idle = values.get(3).copied()? + values.get(4).copied().unwrap_or(0);
    let total: u64 = values.iter().take(8).sum();
    let irq = values.get(5).copied().unwrap_or(0) + values.get(6).copied().unwrap_or(0);
    Some(MachineTicks {
        busy: total.saturating_sub(idle),
        irq,
        total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_and_stat() {
        let status = "Name:\tx\nVmPeak:\t  9000 kB\nVmRSS:\t  4242 kB\nThreads: 3\n";
        assert_eq!(parse_vm_rss(status), Some(4242));
        let stat = "123 (a b) c) S 1 123 123 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
        let machine = "cpu  10 0 5 75 5 2 3 0 0 0\ncpu0 1 2 3 4\n";
        let ticks = parse_machine(machine).expect("cpu line");
        assert_eq!((ticks.busy, ticks.irq, ticks.total), (20, 5, 100));
        let sockstat =
            "sockets: used 41\nTCP: inuse 14 orphan 1 tw 6 alloc 18 mem 263\nUDP: inuse 0 mem 0\n";
        let stat = parse_sockstat(sockstat).expect("a TCP line");
        assert_eq!(
            (
                stat.sockets_used,
                stat.tcp_inuse,
                stat.tcp_orphan,
                stat.tcp_tw,
                stat.tcp_mem_pages
            ),
            (41, 14, 1, 6, 263)
        );
        assert_eq!(stat.tcp_mem_kib(), 1052);
        assert_eq!(
            sockstat_field("TCP6: inuse 2400\nUDP6: inuse 0\n", "TCP6:", "inuse"),
            Some(2400)
        );
        assert!(super::sockstat().is_ok());
    }

    #[test]
    fn reads_this_process() {
        let me = sample(std::process::id()).expect("own /proc entry");
        assert!(me.rss_kib > 0);
        assert!(own().cpu_s >= 0.0);
        assert!(exists(std::process::id()));
    }
}
