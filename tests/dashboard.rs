//! The operators' Grafana dashboard of `docker/` (`grafana/dashboards/hookd.json`): every
//! metric its PromQL queries is one a freshly started hookd exports (so no panel stays empty
//! for a typo or a renamed metric), it has the panels operators look for first, and it uses
//! the data source `docker/` provisions.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::metrics::{sample_names, scrape};
use common::*;
use promql_parser::parser::{self, Expr};
use promql_parser::util::{walk_expr, ExprVisitor};
use serde_json::Value;

const DOCKER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docker");

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(DOCKER).join(path)).unwrap_or_else(|e| panic!("docker/{path}: {e}"))
}

/// Every panel, rows' nested panels included.
fn panels(v: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in v["panels"].as_array().into_iter().flatten() {
        out.push(p);
        out.extend(panels(p));
    }
    out
}

/// Metric names a PromQL expression selects.
struct Selected(BTreeSet<String>);

impl ExprVisitor for Selected {
    type Error = String;
    fn pre_visit(&mut self, e: &Expr) -> Result<bool, String> {
        let vs = match e {
            Expr::VectorSelector(vs) => vs,
            Expr::MatrixSelector(m) => &m.vs,
            _ => return Ok(true),
        };
        let name = vs.name.clone().ok_or_else(|| format!("a selector without a metric name: {vs}"))?;
        self.0.insert(name);
        Ok(true)
    }
}

/// Grafana's interval variables replaced by a duration, so the expression is plain PromQL.
fn promql(expr: &str) -> String {
    ["$__rate_interval", "$__interval", "$__range"].iter().fold(expr.to_string(), |e, var| e.replace(var, "5m"))
}

/// (panel title, expression, metric names it selects) of every query of the dashboard.
fn queries(dashboard: &Value) -> Vec<(String, String, BTreeSet<String>)> {
    let mut out = Vec::new();
    for p in panels(dashboard) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or_default().to_string();
            let expr = t["expr"].as_str().unwrap_or_else(|| panic!("panel `{title}`: a target without `expr`")).to_string();
            let ast = parser::parse(&promql(&expr)).unwrap_or_else(|e| panic!("panel `{title}`: `{expr}` is not PromQL: {e}"));
            let mut selected = Selected(BTreeSet::new());
            walk_expr(&mut selected, &ast).unwrap_or_else(|e| panic!("panel `{title}`: {e}"));
            out.push((title, expr, selected.0));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_queries_is_exported_from_the_first_scrape() {
    let dashboard: Value = serde_json::from_str(&read("grafana/dashboards/hookd.json")).expect("the dashboard is JSON");
    let queries = queries(&dashboard);
    assert!(queries.len() >= 7, "only {} queries", queries.len());
    let (_mock, brokers) = mock_broker();
    let state = tempfile::tempdir().unwrap();
    let (daemon, stop) = start_daemon(config(&brokers, state.path(), "")).await;
    let exported = sample_names(&scrape(&daemon).await);
    stop.cancel();
    daemon.wait().await.unwrap();
    let unknown: Vec<String> = queries
        .iter()
        .flat_map(|(title, expr, names)| {
            names.iter().filter(|n| !exported.contains(*n)).map(move |n| format!("`{n}` in `{title}`: {expr}"))
        })
        .collect();
    assert!(unknown.is_empty(), "the dashboard queries metrics hookd does not export:\n{}", unknown.join("\n"));
    let queried: BTreeSet<&String> = queries.iter().flat_map(|(_, _, names)| names).collect();
    let wanted = [
        "hookd_events_consumed_total",
        "hookd_deliveries_total",
        "hookd_delivery_latency_seconds_bucket",
        "hookd_retry_queue_depth",
        "hookd_dlq_records_total",
        "hookd_open_bundles",
        "hookd_endpoint_disables_total",
        "process_resident_memory_bytes",
    ];
    let absent: Vec<&str> = wanted.into_iter().filter(|w| !queried.contains(&w.to_string())).collect();
    assert!(absent.is_empty(), "no panel shows {absent:?}");
}

#[test]
fn the_dashboard_uses_the_provisioned_prometheus() {
    let dashboard: Value = serde_json::from_str(&read("grafana/dashboards/hookd.json")).expect("the dashboard is JSON");
    let datasource = read("grafana/provisioning/datasources/prometheus.yaml");
    let provider = read("grafana/provisioning/dashboards/hookd.yaml");
    let compose = read("compose.yaml");
    assert!(datasource.contains("url: http://prometheus:9090") && compose.contains("\n  prometheus:\n"), "{datasource}");
    for p in panels(&dashboard).into_iter().filter(|p| p["type"] != "row") {
        let uid = p["datasource"]["uid"].as_str().unwrap_or_else(|| panic!("panel `{}` names no data source", p["title"]));
        assert!(datasource.contains(&format!("uid: {uid}\n")), "panel `{}`: data source `{uid}` is not provisioned", p["title"]);
        for t in p["targets"].as_array().into_iter().flatten() {
            assert_eq!(t["datasource"]["uid"], uid, "panel `{}`", p["title"]);
        }
    }
    assert!(provider.contains("path: /var/lib/grafana/dashboards"), "{provider}");
    for mount in ["./grafana/dashboards:/var/lib/grafana/dashboards:ro", "./grafana/provisioning:/etc/grafana/provisioning:ro"] {
        assert!(compose.contains(mount), "compose.yaml does not mount {mount}");
    }
}
