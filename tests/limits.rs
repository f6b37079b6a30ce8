//! Size limits and records Kafka refuses for good, on librdkafka's mock cluster with a real
//! HTTP receiver: a record that is too large never stops its partition. It is dead-lettered
//! with a `too_large` reason (the source record as the value), the records behind it are
//! delivered, and the committed offset moves past both; a dead letter too large for the
//! dead-letter topic is written truncated and marked.

mod common;

use std::time::Duration;

use common::receiver::{Mode, Receiver};
use common::*;
use rdkafka::types::RDKafkaApiKey;
use rdkafka::types::RDKafkaRespErr;
use serde_json::json;

fn metric(daemon: &hookd::Running, line: &str) -> bool {
    daemon.shared.metrics.render().lines().any(|l| l == line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_900_kb_event_is_delivered_and_where_its_rendering_is_too_large_that_copy_is_dead_lettered_and_the_partition_moves_on() {
    let (_mock, brokers) = mock_broker();
    let rx = Receiver::start().await;
    let state = tempfile::tempdir().unwrap();
    // `twice` renders the event's data two times: 1.8 MB of body, 2.4 MB in base64, over
    // the 2 MiB producer limit that a plain rendering of the same event fits.
    let subs = format!(
        r#"
[dialect.twice]
body = '{{"a": {{{{ event.data | tojson }}}}, "b": {{{{ event.data | tojson }}}}}}'
[[subscription]]
id = "plain"
tenant = "t"
url = "{plain}"
dialect = "standard"
[[subscription]]
id = "big"
tenant = "t"
url = "{big}"
dialect = "twice"
"#,
        plain = rx.url("/plain"),
        big = rx.url("/big")
    );
    let (daemon, stop) = start_daemon(config(&brokers, state.path(), &subs)).await;
    let p = producer(&brokers);
    let large = crm_event("large", "t", "contact.created", json!({"blob": "x".repeat(900_000)}));
    let (partition, first) = produce_at(&p, "crm.events", "k", large.as_bytes()).await;
    let (same, second) = produce_at(&p, "crm.events", "k", crm_event("small", "t", "contact.created", json!({"n": 1})).as_bytes()).await;
    assert_eq!(same, partition, "one key, one partition");

    rx.wait_for(3, Duration::from_secs(60)).await;
    let got = rx.requests();
    assert_eq!(got.iter().filter(|r| r.path == "/plain").count(), 2, "the plain rendering of both events fits");
    assert!(got.iter().any(|r| r.path == "/plain" && r.body.len() > 900_000), "the 900 KB event is delivered whole");
    let big: Vec<_> = got.iter().filter(|r| r.path == "/big").collect();
    assert_eq!(big.len(), 1, "only the small event reaches `big`");
    assert!(big[0].body.len() < 1000);

    let letters = read_topic(&brokers, "hookd.dlq", 1, Duration::from_secs(30));
    assert_eq!(letters.len(), 1);
    let l = &letters[0];
    assert_eq!(rdkafka::Message::payload(l), Some(large.as_bytes()), "the source record is the value");
    let reason = header(l, "hookd-dlq-reason").unwrap();
    assert!(reason.starts_with("too_large: delivery record of ") && reason.contains("for subscription `big` exceeds"), "{reason}");
    assert!(reason.contains("kafka.max_message_bytes = 2097152"), "{reason}");
    assert_eq!(header(l, "hookd-dlq-stage").as_deref(), Some("produce"));
    assert_eq!(header(l, "hookd-dlq-subscription").as_deref(), Some("big"));
    assert_eq!(header(l, "hookd-dlq-offset"), Some(first.to_string()));

    wait_committed_past(&brokers, "hookd-test", "crm.events", partition, second).await;
    assert!(metric(&daemon, "hookd_produce_errors_total{reason=\"too_large\"} 1"), "{}", daemon.shared.metrics.render());
    assert!(metric(&daemon, "hookd_dlq_records_total{stage=\"produce\"} 1"));
    assert!(metric(&daemon, "hookd_deliveries_produced_total{source=\"crm\"} 3"));
    stop.cancel();
    daemon.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_too_large_for_the_dead_letter_topic_is_written_truncated_and_marked() {
    let (_mock, brokers) = mock_broker();
    let rx = Receiver::start().await;
    let state = tempfile::tempdir().unwrap();
    let subs = format!("[[subscription]]\nid = \"s\"\ntenant = \"t\"\nurl = \"{}\"\n", rx.url("/s"));
    let (daemon, stop) = start_daemon(config(&brokers, state.path(), &subs)).await;
    // Over ingest.max_record_bytes (1 MiB), and over the 2 MiB the dead-letter topic takes.
    let p: rdkafka::producer::FutureProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &brokers).set("message.max.bytes", "4000000").create().unwrap();
    let huge = crm_event("huge", "t", "a.b", json!({"blob": "y".repeat(2_500_000)}));
    let (partition, _) = produce_at(&p, "crm.events", "k", huge.as_bytes()).await;
    let (_, next) = produce_at(&p, "crm.events", "k", crm_event("next", "t", "a.b", json!({})).as_bytes()).await;

    rx.wait_for(1, Duration::from_secs(60)).await;
    let letters = read_topic(&brokers, "hookd.dlq", 1, Duration::from_secs(30));
    assert_eq!(letters.len(), 1);
    let l = &letters[0];
    assert_eq!(header(l, "hookd-dlq-truncated"), Some(huge.len().to_string()), "the original length");
    let value = rdkafka::Message::payload(l).unwrap();
    assert!(value.len() < 2 << 20 && value.len() > 1 << 20, "{}", value.len());
    assert_eq!(value, &huge.as_bytes()[..value.len()], "the first bytes of the original");
    assert!(header(l, "hookd-dlq-reason").unwrap().contains("over the limit"));
    wait_committed_past(&brokers, "hookd-test", "crm.events", partition, next).await;
    assert!(metric(&daemon, "hookd_dlq_truncated_total 1"), "{}", daemon.shared.metrics.render());
    stop.cancel();
    daemon.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_record_the_broker_refuses_for_good_is_dead_lettered_and_kept_for_replay() {
    let (mock, brokers) = mock_broker();
    let rx = Receiver::start().await;
    rx.set_mode(Mode::Stall); // the first send times out (request_timeout_ms = 2000)
    let state = tempfile::tempdir().unwrap();
    let subs = format!("[[subscription]]\nid = \"s\"\ntenant = \"t\"\nurl = \"{}\"\nretry = {{ delays_secs = [1] }}\n", rx.url("/s"));
    let (daemon, stop) = start_daemon(config(&brokers, state.path(), &subs)).await;
    let p = producer(&brokers);
    produce(&p, "crm.events", "t", Some(&crm_event("e1", "t", "a.b", json!({})))).await;
    rx.wait_for(1, Duration::from_secs(30)).await;
    // The delivery record is consumed and its request is hanging: the next produce request
    // is the retry record's, and the broker answers it "message too large".
    mock.request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE]);

    let letters = read_topic(&brokers, "hookd.dlq", 1, Duration::from_secs(30));
    assert_eq!(letters.len(), 1);
    let l = &letters[0];
    let reason = header(l, "hookd-dlq-reason").unwrap();
    assert!(reason.starts_with("too_large: retry record of ") && reason.contains("for subscription `s`"), "{reason}");
    assert_eq!(header(l, "hookd-dlq-stage").as_deref(), Some("produce"));
    let record = hookd::deliver::record::DeliveryRecord::decode(rdkafka::Message::payload(l).unwrap()).unwrap();
    assert_eq!((record.attempt, record.subscription_id.as_str()), (1, "s"));
    assert!(record.last_error.is_some(), "the failure that asked for the retry");
    let shared = daemon.shared.clone();
    wait_until(Duration::from_secs(10), "the refused delivery counted and kept for replay", || {
        let (s, m) = (shared.clone(), shared.metrics.render());
        async move { m.contains("hookd_deliveries_total{outcome=\"refused\"} 1") && !s.endpoints.failed_since("s", 0).unwrap().is_empty() }
    })
    .await;
    assert!(metric(&daemon, "hookd_produce_errors_total{reason=\"too_large\"} 1"));
    // The delivery is finished: the sender commits past its record (one record, offset 0).
    let b = brokers.clone();
    wait_until(Duration::from_secs(30), "the sender committed past the delivery record", || {
        let b = b.clone();
        async move {
            for partition in 0..3 {
                if committed_offset(&b, "hookd-test.sender", "hookd.deliveries", partition).await.is_some_and(|c| c >= 1) {
                    return true;
                }
            }
            false
        }
    })
    .await;
    stop.cancel();
    daemon.wait().await.unwrap();
}
