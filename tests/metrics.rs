//! `/metrics` as an operator's Prometheus first sees it: a freshly started daemon (on the mock
//! cluster, nothing consumed or sent yet) already exports every family README.md documents,
//! each documented label value as a series at 0 (so `rate()` and alerts see them from the
//! first scrape), the process metrics, and nothing undocumented; `promtool check metrics` finds
//! nothing to complain about.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::metrics::{documented, families, scrape, series};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_scrape_shows_every_documented_family_and_label_value() {
    let (_mock, brokers) = mock_broker();
    let state = tempfile::tempdir().unwrap();
    let (daemon, stop) = start_daemon(config(&brokers, state.path(), "")).await;
    let text = scrape(&daemon).await;
    let exported = families(&text);
    let series = series(&text);
    let docs = documented();
    let mut missing = Vec::new();
    for d in &docs {
        if !exported.contains_key(&d.name) {
            missing.push(d.name.clone());
        }
        let count = format!("{}_count", d.name);
        let of_family: Vec<_> = series.iter().filter(|(name, _)| *name == d.name || *name == count).collect();
        for (label, values) in &d.labels {
            for v in values {
                if !of_family.iter().any(|(_, labels)| labels.get(label) == Some(v)) {
                    missing.push(format!("{}{{{label}=\"{v}\"}}", d.name));
                }
            }
        }
    }
    assert!(missing.is_empty(), "documented in README but not on the first scrape: {missing:?}\n{text}");
    for process in ["process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds"] {
        assert!(exported.contains_key(process), "{process} is not exported");
    }
    let undocumented: Vec<&String> = exported.keys().filter(|name| !docs.iter().any(|d| &d.name == *name)).collect();
    assert!(undocumented.is_empty(), "exported but not in README's metrics table: {undocumented:?}");
    stop.cancel();
    daemon.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_finds_nothing_to_complain_about() {
    let (_mock, brokers) = mock_broker();
    let state = tempfile::tempdir().unwrap();
    let (daemon, stop) = start_daemon(config(&brokers, state.path(), "")).await;
    let text = scrape(&daemon).await;
    let child =
        Command::new("promtool").args(["check", "metrics"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
    let mut child = child.expect("promtool runs (Debian package `prometheus`, installed by .ci/run)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "promtool check metrics: {said}");
    stop.cancel();
    daemon.wait().await.unwrap();
}
