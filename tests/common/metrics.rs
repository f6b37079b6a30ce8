//! Reading `/metrics` and the metrics table of README.md, for the tests that hold the two to
//! each other (and to the Grafana dashboard of `docker/`).
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};

/// One scrape of a daemon's `/metrics`, as Prometheus would take it.
pub async fn scrape(daemon: &hookd::Running) -> String {
    let resp = reqwest::get(format!("http://{}/metrics", daemon.admin)).await.expect("GET /metrics");
    assert_eq!(resp.status(), 200, "GET /metrics");
    resp.text().await.expect("metrics body")
}

/// The metric families of a scrape (`# TYPE <name> <type>` lines), with their type.
pub fn families(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(name, kind)| (name.to_string(), kind.to_string()))
        .collect()
}

/// The sample names of a scrape (`hookd_x_bucket`, `hookd_x_count`, ... for histograms):
/// what a PromQL selector can match.
pub fn sample_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap_or_default().to_string())
        .collect()
}

/// The series of a scrape: sample name and its labels (`hookd_x_total{a="1",b="2"} 0` gives
/// `("hookd_x_total", {a: 1, b: 2})`; label values here hold no commas or quotes).
pub fn series(text: &str) -> Vec<(String, BTreeMap<String, String>)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.rsplit_once(' ').map(|(s, _)| s))
        .map(|s| match s.split_once('{') {
            None => (s.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let labels = rest.trim_end_matches('}').split(',').filter_map(|kv| kv.split_once('='));
                (name.to_string(), labels.map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string())).collect())
            }
        })
        .collect()
}

/// A metric README.md documents: its name and each of its labels with the label's values.
#[derive(Debug, Clone)]
pub struct Documented {
    pub name: String,
    pub labels: Vec<(String, Vec<String>)>,
}

/// The rows of the metrics table in README.md's "Operations" section:
/// `` | `name` | label: value, value; label: value | meaning | ``.
pub fn documented() -> Vec<Documented> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README.md");
    let section = readme.split("\n### Operations\n").nth(1).expect("README has an Operations section");
    let section = section.split("\n#").next().unwrap_or(section);
    let rows: Vec<Documented> = section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .map(|row| {
            let cells: Vec<&str> = row.split(" | ").collect();
            let name = cells[0].trim_end_matches('`').to_string();
            let labels = cells.get(1).into_iter().flat_map(|c| c.split(';')).filter_map(|l| l.split_once(':'));
            let labels = labels.map(|(label, values)| {
                (label.trim().to_string(), values.split(',').map(|v| v.trim().trim_matches('`').to_string()).collect())
            });
            Documented { name, labels: labels.collect() }
        })
        .collect();
    assert!(rows.len() > 20, "README's metrics table has only {} rows", rows.len());
    rows
}
