//! The performance targets of the project (issue 6), judged from the JSON reports of the
//! standard scenarios that `scripts/bench` runs.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::error::BenchError;
use crate::options::TargetsArgs;
use crate::report::{Report, fmt_int, fmt_us};

/// The server's receiver "keeps up" when it has forwarded every message at no less than this
/// share of the rate at which the bare LISTEN connection completes.
pub const KEEP_UP_RATIO: f64 = 0.9;
/// RSS is "flat" when the last sample after warm-up exceeds the first by at most this much.
pub const SOAK_GROWTH_PCT: f64 = 5.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Verdict {
    #[serde(rename = "PASS")]
    Pass,
    #[serde(rename = "FAIL")]
    Fail,
    /// The scenario's report was not given or lacks the figure.
    #[serde(rename = "not run")]
    NotRun,
}

impl Verdict {
    fn of(ok: bool) -> Verdict {
        if ok { Verdict::Pass } else { Verdict::Fail }
    }

    fn label(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::NotRun => "not run",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub target: String,
    pub threshold: String,
    pub measured: String,
    pub verdict: Verdict,
}

fn row(target: &str, threshold: &str, judged: Option<(String, bool)>) -> Row {
    let (measured, verdict) = match judged {
        Some((measured, ok)) => (measured, Verdict::of(ok)),
        None => ("-".to_owned(), Verdict::NotRun),
    };
    Row {
        target: target.to_owned(),
        threshold: threshold.to_owned(),
        measured,
        verdict,
    }
}

/// The reports of the standard scenarios, each optional.
#[derive(Debug, Default)]
pub struct Reports {
    pub idle: Option<Report>,
    pub fanout_max: Option<Report>,
    pub fanout_rate: Option<Report>,
    pub connect_10k: Option<Report>,
    pub stuck_baseline: Option<Report>,
    pub stuck: Option<Report>,
    pub soak: Option<Report>,
    /// `send-floor`: shown beside target 3's CPU per frame, never judged.
    pub send_floor: Option<Report>,
}

fn loss_text(r: &Report) -> Option<(String, bool)> {
    let d = r.delivery.as_ref()?;
    let clean = d.counts.is_clean() && d.clients_closed == 0 && !d.drain_timed_out;
    Some((
        format!(
            "{} of {} frames, lost {}, dup {}, ooo {}, {} closed",
            fmt_int(d.counts.delivered),
            fmt_int(d.expected),
            fmt_int(d.counts.lost),
            fmt_int(d.counts.duplicated),
            fmt_int(d.counts.out_of_order),
            d.clients_closed
        ),
        clean && d.clients_complete == r.settings.clients,
    ))
}

fn cpu_per_frame(r: &Report, limit: f64) -> Option<(String, bool)> {
    let v = r.server.as_ref()?.cpu_us_per_frame?;
    Some((format!("{v:.2} µs"), v <= limit))
}

/// The bare-send floor, for the reader to weigh the server's CPU per frame against what the
/// kernel charges for the same sends on this machine; `None` without a usable report.
fn floor_text(r: &Report) -> Option<String> {
    let us = r.floor.as_ref()?.us_per_send?;
    Some(if r.problems.is_empty() {
        format!("bare send floor {us:.2} µs")
    } else {
        format!("bare send floor {us:.2} µs, its run had problems")
    })
}

pub fn evaluate(r: &Reports) -> Vec<Row> {
    let mut rows = Vec::new();
    rows.push(row(
        "1. idle: server RSS per connection (10,000 clients)",
        "≤ 8 KiB",
        r.idle.as_ref().and_then(|r| {
            let i = r.idle.as_ref()?;
            let v = i.rss_per_client_kib?;
            Some((
                format!("{v:.1} KiB ({} clients)", fmt_int(i.clients as u64)),
                v <= 8.0 && r.problems.is_empty(),
            ))
        }),
    ));
    let max = r.fanout_max.as_ref();
    rows.push(row(
        "2. 1,000 clients, max rate: frames/s delivered",
        "≥ 1,000,000",
        max.and_then(|r| {
            let d = r.delivery.as_ref()?;
            Some((
                fmt_int(d.frames_per_s.round() as u64),
                d.frames_per_s >= 1e6,
            ))
        }),
    ));
    rows.push(row(
        "2. 1,000 clients, max rate: server CPU per frame",
        "≤ 1 µs",
        max.and_then(|r| cpu_per_frame(r, 1.0)),
    ));
    rows.push(row(
        "2. 1,000 clients, max rate: no loss",
        "0 lost",
        max.and_then(loss_text),
    ));
    let rate = r.fanout_rate.as_ref();
    rows.push(row(
        "3. 1,000 clients at 50 msg/s: p99 NOTIFY → frame",
        "≤ 10 ms",
        rate.and_then(|r| {
            let l = r.latency.as_ref()?;
            let clean = r.delivery.as_ref()?.counts.is_clean();
            Some((
                format!(
                    "{}{}",
                    fmt_us(l.p99_us),
                    if clean { "" } else { " (with loss)" }
                ),
                l.p99_us <= 10_000.0 && clean,
            ))
        }),
    ));
    rows.push(row(
        "3. 1,000 clients at 50 msg/s: server CPU per frame",
        "≤ 5 µs",
        rate.and_then(|r| cpu_per_frame(r, 5.0))
            .map(
                |(measured, ok)| match r.send_floor.as_ref().and_then(floor_text) {
                    Some(floor) => (format!("{measured} ({floor})"), ok),
                    None => (measured, ok),
                },
            ),
    ));
    let c10k = r.connect_10k.as_ref();
    rows.push(row(
        "4. 10,000 clients connect",
        "≤ 2 s",
        c10k.and_then(|r| {
            let c = r.connect.as_ref()?;
            Some((
                format!("{:.2} s ({} failed)", c.total_s, c.failed),
                c.total_s <= 2.0 && c.failed == 0,
            ))
        }),
    ));
    rows.push(row(
        "4. 10,000 clients: each gets every message",
        "0 lost",
        c10k.and_then(loss_text),
    ));
    rows.push(row(
        "4. receiver keeps up with raw LISTEN (same publishers)",
        &format!("≥ {KEEP_UP_RATIO:.1}× raw rate"),
        c10k.and_then(|r| {
            let k = r.receiver.as_ref()?;
            Some((
                format!(
                    "{:.2}× ({} vs {} msg/s)",
                    k.ratio,
                    fmt_int(k.server_msgs_per_s.round() as u64),
                    fmt_int(k.raw_msgs_per_s.round() as u64)
                ),
                k.ratio >= KEEP_UP_RATIO,
            ))
        }),
    ));
    let stuck = r.stuck.as_ref();
    rows.push(row(
        "5. 50 clients + 2 stuck: the 50 get everything",
        "0 lost",
        stuck.and_then(loss_text),
    ));
    rows.push(row(
        "5. 50 clients + 2 stuck: p99 vs without stuck",
        "≤ 2×",
        stuck.zip(r.stuck_baseline.as_ref()).and_then(|(s, b)| {
            let with = s.latency.as_ref()?.p99_us;
            let without = b.latency.as_ref()?.p99_us;
            Some((
                format!(
                    "{} vs {} ({:.2}×)",
                    fmt_us(with),
                    fmt_us(without),
                    with / without.max(1e-9)
                ),
                with <= 2.0 * without,
            ))
        }),
    ));
    rows.push(row(
        "5. the stuck clients are closed",
        "2 of 2",
        stuck.and_then(|r| {
            let s = r.stuck.as_ref()?;
            Some((
                format!("{} of {} ({})", s.closed, s.count, s.ends.join(", ")),
                s.closed == s.count,
            ))
        }),
    ));
    rows.push(row(
        "6. soak 1,000 clients, 100 msg/s: RSS flat after warm-up",
        &format!("growth ≤ {SOAK_GROWTH_PCT:.0} %"),
        r.soak.as_ref().and_then(|r| {
            let s = r.soak.as_ref()?;
            Some((
                format!(
                    "{} → {} KiB ({:+.1} %, max {} KiB, {:.0} s)",
                    fmt_int(s.first_kib),
                    fmt_int(s.last_kib),
                    s.growth_pct,
                    fmt_int(s.max_kib),
                    s.samples.last().map_or(0.0, |&(t, _)| t)
                ),
                s.growth_pct <= SOAK_GROWTH_PCT && s.samples.len() >= 2,
            ))
        }),
    ));
    rows
}

pub fn table(rows: &[Row]) -> String {
    let w0 = rows
        .iter()
        .map(|r| r.target.chars().count())
        .max()
        .unwrap_or(0);
    let w1 = rows
        .iter()
        .map(|r| r.threshold.chars().count())
        .max()
        .unwrap_or(0);
    let w2 = rows
        .iter()
        .map(|r| r.measured.chars().count())
        .max()
        .unwrap_or(0);
    let pad = |s: &str, w: usize| format!("{s}{}", " ".repeat(w.saturating_sub(s.chars().count())));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}  {}  {}  verdict",
        pad("target", w0),
        pad("threshold", w1),
        pad("measured", w2)
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{}  {}  {}  {}",
            pad(&r.target, w0),
            pad(&r.threshold, w1),
            pad(&r.measured, w2),
            r.verdict.label()
        );
    }
    let passed = rows.iter().filter(|r| r.verdict == Verdict::Pass).count();
    let failed = rows.iter().filter(|r| r.verdict == Verdict::Fail).count();
    let _ = writeln!(out, "{passed} passed, {failed} failed");
    out
}

fn read(path: &Option<std::path::PathBuf>) -> Result<Option<Report>, BenchError> {
    let Some(path) = path else { return Ok(None) };
    read_report(path).map(Some)
}

pub fn read_report(path: &Path) -> Result<Report, BenchError> {
    let text = std::fs::read_to_string(path)
        .map_err(|err| BenchError::Usage(format!("{}: {err}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|err| BenchError::Usage(format!("{}: not a report: {err}", path.display())))
}

/// Reads the reports named in `args` and judges them; the text and whether all that ran passed.
pub fn run(args: &TargetsArgs) -> Result<(String, bool), BenchError> {
    let reports = Reports {
        idle: read(&args.idle)?,
        fanout_max: read(&args.fanout_max)?,
        fanout_rate: read(&args.fanout_rate)?,
        connect_10k: read(&args.connect_10k)?,
        stuck_baseline: read(&args.stuck_baseline)?,
        stuck: read(&args.stuck)?,
        soak: read(&args.soak)?,
        send_floor: read(&args.send_floor)?,
    };
    let rows = evaluate(&reports);
    let all_passed = rows.iter().all(|r| r.verdict != Verdict::Fail);
    let text = if args.json {
        serde_json::to_string_pretty(&rows).expect("rows serialise") + "\n"
    } else {
        table(&rows)
    };
    Ok((text, all_passed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Delivery, Floor, Idle, ServerUse, Settings};
    use crate::stats::Counts;

    #[test]
    fn judges_what_was_run() {
        let idle = Report {
            idle: Some(Idle {
                clients: 10_000,
                rss_per_client_kib: Some(7.5),
                ..Idle::default()
            }),
            ..Report::default()
        };
        let max = Report {
            settings: Settings {
                clients: 1000,
                ..Settings::default()
            },
            delivery: Some(Delivery {
                expected: 10,
                counts: Counts {
                    delivered: 9,
                    lost: 1,
                    ..Counts::default()
                },
                frames_per_s: 2e6,
                ..Delivery::default()
            }),
            server: Some(ServerUse {
                cpu_us_per_frame: Some(1.5),
                ..ServerUse::default()
            }),
            ..Report::default()
        };
        let rows = evaluate(&Reports {
            idle: Some(idle),
            fanout_max: Some(max),
            ..Reports::default()
        });
        let verdicts: Vec<Verdict> = rows.iter().take(4).map(|r| r.verdict).collect();
        assert_eq!(
            verdicts,
            [Verdict::Pass, Verdict::Pass, Verdict::Fail, Verdict::Fail]
        );
        assert!(rows[4..].iter().all(|r| r.verdict == Verdict::NotRun));
        let text = table(&rows);
        assert!(text.contains("2 passed, 2 failed"), "{text}");
    }

    #[test]
    fn shows_the_send_floor_beside_cpu_per_frame_at_50() {
        let rate = |us: f64| Report {
            server: Some(ServerUse {
                cpu_us_per_frame: Some(us),
                ..ServerUse::default()
            }),
            ..Report::default()
        };
        let floor = Report {
            floor: Some(Floor {
                us_per_send: Some(5.9),
                ..Floor::default()
            }),
            ..Report::default()
        };
        let cpu_row = |reports: &Reports| {
            evaluate(reports)
                .into_iter()
                .find(|r| r.target == "3. 1,000 clients at 50 msg/s: server CPU per frame")
                .expect("the row")
        };
        let over = cpu_row(&Reports {
            fanout_rate: Some(rate(5.98)),
            send_floor: Some(floor.clone()),
            ..Reports::default()
        });
        assert_eq!(over.measured, "5.98 µs (bare send floor 5.90 µs)");
        assert_eq!(over.verdict, Verdict::Fail);
        let under = cpu_row(&Reports {
            fanout_rate: Some(rate(4.5)),
            send_floor: Some(floor.clone()),
            ..Reports::default()
        });
        assert_eq!(
            (under.measured.as_str(), under.verdict),
            ("4.50 µs (bare send floor 5.90 µs)", Verdict::Pass)
        );
        let without = cpu_row(&Reports {
            fanout_rate: Some(rate(5.98)),
            ..Reports::default()
        });
        assert_eq!(without.measured, "5.98 µs");
        let troubled = cpu_row(&Reports {
            fanout_rate: Some(rate(5.98)),
            send_floor: Some(Report {
                problems: vec!["3 sends would have blocked".to_owned()],
                ..floor.clone()
            }),
            ..Reports::default()
        });
        assert_eq!(
            troubled.measured,
            "5.98 µs (bare send floor 5.90 µs, its run had problems)"
        );
        let not_run = cpu_row(&Reports {
            send_floor: Some(floor),
            ..Reports::default()
        });
        assert_eq!(
            (not_run.measured.as_str(), not_run.verdict),
            ("-", Verdict::NotRun)
        );
    }
}
