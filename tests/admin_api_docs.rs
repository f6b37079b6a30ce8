//! Runs every example of `docs/ADMIN-API.md` against a live daemon and checks the status
//! written above it, so the documentation cannot drift from the API. An example marked
//! `(Kafka down)` is sent with the mock cluster's broker down.

mod common;

use common::receiver::Receiver;
use common::*;

struct Example {
    expect: u16,
    kafka_down: bool,
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: String,
}

fn examples(doc: &str) -> Vec<Example> {
    let mut out = Vec::new();
    let mut rest = doc;
    while let Some(i) = rest.find("<!-- expect: ") {
        rest = &rest[i + "<!-- expect: ".len()..];
        let expect: u16 = rest[..3].parse().expect("status in expect comment");
        let kafka_down = rest[..rest.find("-->").expect("closed expect comment")].contains("(Kafka down)");
        let start = rest.find("```http\n").expect("http block after expect") + "```http\n".len();
        let end = start + rest[start..].find("```").expect("closed block");
        let block = &rest[start..end];
        let (head, body) = block.split_once("\n\n").unwrap_or((block, ""));
        let mut lines = head.lines();
        let (method, path) = lines.next().unwrap().split_once(' ').unwrap();
        let headers = lines.filter_map(|l| l.split_once(": ")).map(|(k, v)| (k.to_string(), v.to_string())).collect();
        out.push(Example { expect, kafka_down, method: method.into(), path: path.trim().into(), headers, body: body.trim().into() });
        rest = &rest[end..];
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_example_answers_as_documented() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/ADMIN-API.md")).unwrap();
    let examples = examples(&doc);
    assert!(examples.len() >= 10, "found only {} examples", examples.len());
    assert!(examples.iter().any(|e| e.kafka_down && e.expect == 503), "the 503 of an unreachable Kafka is documented");
    let (mock, brokers) = mock_broker();
    let rx = Receiver::start().await;
    let state = tempfile::tempdir().unwrap();
    let subs = format!("[[subscription]]\nid = \"sub_1\"\ntenant = \"t\"\nurl = \"{}\"\n{}", rx.url("/sub_1"), common::portal::SECTION);
    let mut cfg = config(&brokers, state.path(), &subs);
    cfg.admin.produce_timeout_ms = 1000;
    let token = cfg.admin.token.clone();
    let (daemon, stop) = start_daemon(cfg).await;
    let client = reqwest::Client::new();
    for ex in &examples {
        let mut req = client.request(ex.method.parse().unwrap(), format!("http://{}{}", daemon.admin, ex.path));
        for (k, v) in &ex.headers {
            req = req.header(k, v.replace("$HOOKD_TOKEN", &token));
        }
        if !ex.body.is_empty() {
            req = req.body(ex.body.clone());
        }
        if ex.kafka_down {
            mock.broker_down(-1).unwrap();
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        if ex.kafka_down {
            mock.broker_up(-1).unwrap();
        }
        assert_eq!(status, ex.expect, "{} {} answered {status}: {text}", ex.method, ex.path);
        assert!(serde_json::from_str::<serde_json::Value>(&text).is_ok(), "{} {} answered non-JSON: {text}", ex.method, ex.path);
    }
    stop.cancel();
    daemon.wait().await.unwrap();
}
