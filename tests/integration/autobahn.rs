//! Autobahn's websocket conformance cases, run by kosoku (from PyPI), against the real server.
//!
//! Every case must pass on both verdicts, `behavior` (what the server sent) and `behaviorClose`
//! (how the connection ended: the right close code, and the server closing the TCP connection
//! itself), except the echo-only cases listed with their reason in `autobahn_echo_only.txt`.
//! NON-STRICT counts as a failure here: it is what a server that fails late, rather than at the
//! first invalid byte, gets.
//!
//! Ignored by default, as it needs `kosoku` on PATH: `scripts/test` installs it and runs this
//! with `cargo test --test integration autobahn -- --ignored --nocapture`, which prints the
//! summary. It takes under a minute.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::harness::{PgCluster, Server, ServerOpts};

/// The cases not judged, and why.
const ECHO_ONLY: &str = include_str!("autobahn_echo_only.txt");

/// Cases run at once. Most echo cases wait some seconds for echoes that never come: run
/// together, they take as long as the slowest one.
const PARALLELISM: usize = 32;

/// Failure guard for a run (which takes about 20 s).
const RUN_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// Verdicts that pass. NON-STRICT does not (see the module's doc).
const PASSING: [&str; 2] = ["OK", "INFORMATIONAL"];

/// A case the test does not judge.
#[derive(Debug)]
struct Listed {
    reason: String,
    /// Left out of the run (it would only wait out its timeout); its id is still checked to be
    /// one of the suite's.
    not_run: bool,
}

/// The echo-only list: case id to why. A `reason:` line gives the reason for the case ids that
/// follow; `reason (not run):` also leaves them out of the run.
fn echo_only(text: &str) -> Result<BTreeMap<String, Listed>> {
    let mut listed = BTreeMap::new();
    let mut reason: Option<(&str, bool)> = None;
    for (number, line) in text.lines().enumerate() {
        let number = number + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let header = match (
            line.strip_prefix("reason:"),
            line.strip_prefix("reason (not run):"),
        ) {
            (Some(why), _) => Some((why.trim(), false)),
            (_, Some(why)) => Some((why.trim(), true)),
            _ => None,
        };
        if let Some((why, not_run)) = header {
            ensure!(!why.is_empty(), "line {number}: empty reason");
            reason = Some((why, not_run));
            continue;
        }
        ensure!(
            line.split('.').all(|part| part.parse::<u32>().is_ok()),
            "line {number}: {line:?} is not a case id"
        );
        let (why, not_run) =
            reason.with_context(|| format!("line {number}: {line} has no reason"))?;
        let entry = Listed {
            reason: why.to_owned(),
            not_run,
        };
        ensure!(
            listed.insert(line.to_owned(), entry).is_none(),
            "line {number}: {line} is listed twice"
        );
    }
    Ok(listed)
}

/// Runs kosoku against `url` with `args`; its output, or why it did not run.
async fn kosoku(url: &str, args: &[String]) -> Result<std::process::Output> {
    let mut command = tokio::process::Command::new("kosoku");
    command
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(RUN_TIMEOUT, command.output()).await {
        Err(_) => bail!("kosoku {args:?} did not finish within {RUN_TIMEOUT:?}"),
        Ok(Err(err)) if err.kind() == std::io::ErrorKind::NotFound => {
            bail!("kosoku is not on PATH ({err}): install it with `pip install kosoku`")
        }
        Ok(output) => output.context("run kosoku"),
    }
}

/// kosoku's output, for failure messages.
fn output_text(output: &std::process::Output) -> String {
    format!(
        "{}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Case ids in the suite's order (1.2.10 after 1.2.9).
fn case_order(id: &str) -> Vec<u32> {
    id.split('.').filter_map(|part| part.parse().ok()).collect()
}

/// One case's verdicts, from kosoku's `index.json`.
struct Verdict {
    behavior: String,
    close: String,
    report: String,
}

impl Verdict {
    fn passed(&self) -> bool {
        PASSING.contains(&self.behavior.as_str()) && PASSING.contains(&self.close.as_str())
    }
}

/// kosoku's verdicts by case id: `index.json` maps the agent (the server) to its cases.
fn read_index(dir: &Path) -> Result<HashMap<String, Verdict>> {
    let path = dir.join("index.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let index: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
    let agents = index.as_object().context("index.json is not an object")?;
    ensure!(agents.len() == 1, "index.json has {} agents", agents.len());
    let (_, cases) = agents.iter().next().expect("one agent");
    let field = |case: &serde_json::Value, name: &str| -> Result<String> {
        case[name]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("{name} in {case}"))
    };
    cases
        .as_object()
        .context("the agent's cases are not an object")?
        .iter()
        .map(|(id, case)| {
            let verdict = Verdict {
                behavior: field(case, "behavior")?,
                close: field(case, "behaviorClose")?,
                report: field(case, "reportfile")?,
            };
            Ok((id.clone(), verdict))
        })
        .collect()
}

/// Why a case failed, from its report: what the suite says of each verdict.
fn explain(dir: &Path, verdict: &Verdict) -> String {
    let report = std::fs::read_to_string(dir.join(&verdict.report))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok());
    let said = |name: &str| {
        report
            .as_ref()
            .and_then(|r| r[name].as_str().map(str::to_owned))
            .unwrap_or_default()
    };
    format!(
        "behavior {} ({}), behaviorClose {} ({})",
        verdict.behavior,
        said("result"),
        verdict.close,
        said("resultClose")
    )
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs kosoku on PATH (pip install kosoku); scripts/test runs it"]
async fn autobahn_cases_pass_except_echo_only_ones() -> Result<()> {
    let listed = echo_only(ECHO_ONLY).context("autobahn_echo_only.txt")?;
    let pg = PgCluster::shared().await;
    // No heartbeat and no ping during the run: a case counts every frame the server sends.
    let opts = ServerOpts::with_db(pg, "autobahn").env("PING_INTERVAL", 3600);
    let mut server = Server::spawn(opts).await?;
    let reports = tempfile::Builder::new()
        .prefix("vulcan-autobahn-")
        .tempdir()
        .context("reports directory")?;
    let url = format!("ws://127.0.0.1:{}/stream", server.port());

    // The cases left out must still be in the suite: kosoku refuses an unknown case id given
    // to --include, and here --exclude then takes each one out again, so nothing runs.
    let not_run: Vec<&String> = listed
        .iter()
        .filter(|(_, entry)| entry.not_run)
        .map(|(id, _)| id)
        .collect();
    let mut args = Vec::new();
    for (flag, id) in ["--include", "--exclude"]
        .iter()
        .flat_map(|flag| not_run.iter().map(move |id| (flag, id)))
    {
        args.extend([flag.to_string(), id.to_string()]);
    }
    let check = kosoku(&url, &args).await?;
    ensure!(
        check.status.success(),
        "a case listed as not run is not in the suite (take it off the list): {}",
        output_text(&check)
    );

    let mut args = vec![
        "--parallelism".to_owned(),
        PARALLELISM.to_string(),
        "--outdir".to_owned(),
        reports.path().display().to_string(),
    ];
    for id in &not_run {
        args.extend(["--exclude".to_owned(), id.to_string()]);
    }
    let output = kosoku(&url, &args).await?;
    // kosoku exits 1 when any case failed, as the echo-only ones do: judge from its reports.
    let verdicts = read_index(reports.path())
        .with_context(|| format!("kosoku wrote no reports: {}", output_text(&output)))?;

    let mut ids: Vec<&String> = verdicts.keys().collect();
    ids.sort_by_key(|id| case_order(id));
    let mut problems = Vec::new();
    let (mut passed, mut failed, mut excluded) = (0, 0, 0);
    for id in ids {
        let verdict = &verdicts[id];
        match (listed.get(id), verdict.passed()) {
            (Some(_), false) => excluded += 1,
            (Some(entry), true) => problems.push(format!(
                "{id}: listed as echo-only ({}) but passed: judge it, take it off the list",
                entry.reason
            )),
            (None, true) => passed += 1,
            (None, false) => {
                failed += 1;
                problems.push(format!("{id}: {}", explain(reports.path(), verdict)));
            }
        }
    }
    for (id, entry) in &listed {
        match (entry.not_run, verdicts.contains_key(id)) {
            (false, false) => problems.push(format!(
                "{id}: listed as echo-only ({}) but not in the run: take it off the list",
                entry.reason
            )),
            (true, true) => problems.push(format!("{id}: listed as not run, but ran")),
            (true, false) => excluded += 1,
            (false, true) => {}
        }
    }
    eprintln!(
        "autobahn: {passed} passed, {failed} failed, {excluded} echo-only excluded ({} of them \
         not run)",
        not_run.len()
    );
    if !problems.is_empty() {
        // Kept for a look: index.html there shows each case's wire log.
        let kept = reports.keep();
        bail!(
            "{} problem(s); kosoku's reports are in {}:\n{}",
            problems.len(),
            kept.display(),
            problems.join("\n")
        );
    }
    server.quiet_on_drop();
    Ok(())
}

#[test]
fn the_echo_only_list_parses() {
    let listed = echo_only(ECHO_ONLY).expect("autobahn_echo_only.txt");
    assert!(listed.contains_key("1.1.1"), "{listed:?}");
    assert!(listed["9.7.6"].not_run, "{listed:?}");
    assert!(echo_only("1.1.1\n").is_err(), "an id without a reason");
    assert!(
        echo_only("reason: x\n1.1.1\n1.1.1\n").is_err(),
        "an id twice"
    );
    assert!(echo_only("reason: x\n1.a\n").is_err(), "not an id");
}
