//! Owner e-mail (`[notify.smtp]`) on the mock cluster, with a real receiver and a local SMTP
//! sink: hookd's own disables are mailed to `owner_email` (recipient, subject and body checked
//! on the received mail), operators' disables are not, and a relay that refuses or never
//! answers is counted and logged while the notice on `hookd.notifications` and every other
//! delivery go on.

mod common;

use std::time::Duration;

use common::api::Api;
use common::receiver::{Mode, Receiver};
use common::smtp::{Behaviour, SmtpSink};
use common::*;
use serde_json::{json, Value};

fn subscription(id: &str, tenant: &str, url: &str, owner: Option<&str>) -> String {
    let owner = owner.map(|o| format!("owner_email = \"{o}\"\n")).unwrap_or_default();
    format!("[[subscription]]\nid = \"{id}\"\ntenant = \"{tenant}\"\nurl = \"{url}\"\n{owner}disable_after_failures = 1\nretry = {{ delays_secs = [1], max_attempts = 5 }}\n")
}

async fn event(brokers: &str, id: &str, tenant: &str) {
    produce(&producer(brokers), "crm.events", tenant, Some(&crm_event(id, tenant, "contact.created", json!({"contact": {"id": id}}))))
        .await;
}

/// The values of `hookd.notifications` once at least `n` are there.
async fn notices(brokers: &str, n: usize) -> Vec<Value> {
    let brokers = brokers.to_string();
    let read = tokio::task::spawn_blocking(move || read_topic(&brokers, "hookd.notifications", n, Duration::from_secs(60))).await.unwrap();
    assert!(read.len() >= n, "{} of {n} notices on hookd.notifications", read.len());
    read.iter().map(|m| serde_json::from_slice(rdkafka::Message::payload(m).unwrap()).unwrap()).collect()
}

async fn wait_emails(daemon: &hookd::Running, outcome: &str, n: u64) {
    let counter = daemon.shared.metrics.owner_emails.with_label_values(&[outcome]);
    wait_until(Duration::from_secs(60), &format!("{n} owner e-mail(s) {outcome}"), || {
        let got = counter.get();
        async move { got >= n }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hookd_mails_the_owner_when_it_disables_an_endpoint_and_not_for_an_operator() {
    let (_mock, brokers) = mock_broker();
    let rx = Receiver::start().await;
    rx.set_path_mode("/shaky", Mode::Status(500));
    rx.set_path_mode("/ownerless", Mode::Status(410));
    rx.set_path_mode("/later", Mode::Status(410));
    let sink = SmtpSink::start(Behaviour::Accept).await;
    let subs = [
        subscription("shaky", "t", &rx.url("/shaky"), Some("owner@example.com")),
        subscription("ownerless", "t", &rx.url("/ownerless"), None),
        subscription("calm", "u", &rx.url("/calm"), Some("calm@example.com")),
        subscription("later", "v", &rx.url("/later"), Some("later@example.com")),
    ];
    let state = tempfile::tempdir().unwrap();
    let (daemon, stop) = start_daemon(config(&brokers, state.path(), &format!("{}{}", subs.concat(), sink.config("")))).await;
    event(&brokers, "e1", "t").await;
    wait_emails(&daemon, "sent", 1).await;
    wait_emails(&daemon, "no_address", 1).await;
    let mails = sink.mails();
    assert_eq!(mails.len(), 1, "{mails:?}");
    let mail = &mails[0];
    assert_eq!((mail.from.as_str(), mail.to.as_slice()), ("hookd@example.com", ["owner@example.com".to_string()].as_slice()));
    assert_eq!(mail.header("To").as_deref(), Some("owner@example.com"), "{}", mail.data);
    assert_eq!(mail.header("Subject").as_deref(), Some("Webhook endpoint disabled: shaky"), "{}", mail.data);
    let body = mail.body();
    for said in ["Subscription: shaky", "Tenant:       t", "/shaky", "2 consecutive failed requests", "status 500"] {
        assert!(body.contains(said), "the body does not say `{said}`:\n{}", mail.data);
    }
    // An operator's disable is written to Kafka but not mailed; mails go out in order, so the
    // next disable's mail arriving alone shows none was queued for it.
    Api::new(&daemon).post("/api/subscriptions/calm/disable", None).await;
    event(&brokers, "e2", "v").await;
    wait_emails(&daemon, "sent", 2).await;
    let to: Vec<Vec<String>> = sink.mails().into_iter().map(|m| m.to).collect();
    assert_eq!(to, [vec!["owner@example.com".to_string()], vec!["later@example.com".to_string()]]);
    assert!(sink.mails()[1].body().contains("410 Gone"), "{}", sink.mails()[1].data);
    // The Kafka record stays the source of truth: one notice per disable, mailed or not.
    let mut noticed: Vec<String> = notices(&brokers, 4).await.iter().map(|n| n["subscription"].as_str().unwrap().to_string()).collect();
    noticed.sort();
    assert_eq!(noticed, ["calm", "later", "ownerless", "shaky"]);
    let m = &daemon.shared.metrics.owner_emails;
    assert_eq!((m.with_label_values(&["failed"]).get(), m.with_label_values(&["dropped"]).get()), (0, 0));
    stop.cancel();
    daemon.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_refuses_the_recipient_is_counted_and_the_notice_stands() {
    let (_mock, brokers) = mock_broker();
    let rx = Receiver::start().await;
    rx.set_mode(Mode::Status(410));
    let sink = SmtpSink::start(Behaviour::RefuseRecipients).await;
    let subs = subscription("gone", "t", &rx.url("/gone"), Some("owner@example.com"));
    let state = tempfile::tempdir().unwrap();
    let (daemon, stop) = start_daemon(config(&brokers, state.path(), &format!("{subs}{}", sink.config("")))).await;
    event(&brokers, "e1", "t").await;
    wait_emails(&daemon, "failed", 1).await;
    assert!(sink.mails().is_empty());
    let notice = &notices(&brokers, 1).await[0];
    assert_eq!((notice["type"].as_str(), notice["owner_email"].as_str()), (Some("endpoint.disabled"), Some("owner@example.com")));
    stop.cancel();
    daemon.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_never_answers_holds_back_no_delivery_and_stopping_drops_its_mail() {
    let (_mock, brokers) = mock_broker();
    let rx = Receiver::start().await;
    rx.set_path_mode("/gone", Mode::Status(410));
    let sink = SmtpSink::start(Behaviour::Silent).await;
    let subs = [subscription("gone", "t", &rx.url("/gone"), Some("owner@example.com")), subscription("fine", "u", &rx.url("/fine"), None)];
    let state = tempfile::tempdir().unwrap();
    let cfg = config(&brokers, state.path(), &format!("{}{}", subs.concat(), sink.config("timeout_ms = 120000")));
    let (daemon, stop) = start_daemon(cfg).await;
    event(&brokers, "e1", "t").await;
    assert_eq!(notices(&brokers, 1).await[0]["subscription"], "gone");
    event(&brokers, "e2", "u").await;
    wait_until(Duration::from_secs(30), "the other subscription's delivery", || {
        let n = rx.requests().iter().filter(|r| r.path == "/fine").count();
        async move { n == 1 }
    })
    .await;
    let shared = daemon.shared.clone();
    let mail = |outcome: &str| shared.metrics.owner_emails.with_label_values(&[outcome]).get();
    assert_eq!((mail("sent"), mail("failed")), (0, 0), "the mail is still waiting for the relay");
    // A graceful stop waits for it at most shutdown.grace_ms (3 s here), not the 120 s timeout.
    stop.cancel();
    daemon.wait().await.unwrap();
    assert_eq!((mail("sent"), mail("failed"), mail("dropped")), (0, 0, 1));
}
