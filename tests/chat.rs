//! Chat bundling on the mock cluster with a manual clock: windows are picked by message
//! time and closed by the clock, so a 1 h window closes without waiting an hour.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::chat::*;
use common::receiver::Receiver;
use common::*;
use hookd::window::clock::ManualClock;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// A daemon with a 1 h bundle subscription (`/bundles`) and a pass-through one (`/each`).
async fn start(brokers: &str, state: &std::path::Path, rx: &Receiver, clock: Arc<ManualClock>) -> (hookd::Running, CancellationToken) {
    let subs =
        chat_subscription("bundles", TENANT, "1h", &rx.url("/bundles")) + &chat_subscription("each", TENANT, "none", &rx.url("/each"));
    start_on_clock(config(brokers, state, &subs), clock).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_close_by_the_clock_with_messages_in_time_order_and_escaped_summary() {
    let (_mock, brokers) = mock_broker();
    let rx = Receiver::start().await;
    let state = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0 + 60_000));
    let (daemon, stop) = start(&brokers, state.path(), &rx, clock.clone()).await;
    let p = producer(&brokers);
    // Chat A: three messages, the second published last but timed first; chat B: one message.
    produce(&p, "chat.messages", "A", Some(&message("a1", "A", T0 + 300_000, "John Doe", "Hi! How are you? 👋"))).await;
    produce(
        &p,
        "chat.messages",
        "A",
        Some(&message("a3", "A", T0 + 600_000, "Jane <b>\"Smith\"</b>", "<script>alert('x')</script> & more")),
    )
    .await;
    produce(&p, "chat.messages", "A", Some(&message("a0", "A", T0, "John Doe", "Xin chào"))).await;
    produce(&p, "chat.messages", "B", Some(&message("b1", "B", T0 + 1_000, "Jane Smith", "hello"))).await;
    let with_attachment =
        message("att", "A", T0 + 2_000, "John Doe", "photo").replace("\"attachments\":[]", "\"attachments\":[{\"url\":\"x\"}]");
    produce(&p, "chat.messages", "A", Some(&with_attachment)).await;

    // Pass-through delivers each text message at once; the attachment is skipped.
    let each = rx.wait_for(4, Duration::from_secs(30)).await;
    assert!(each.iter().all(|r| r.path == "/each"), "no bundle before the window closes");
    let single: Value = serde_json::from_slice(&each[0].body).unwrap();
    assert!(single["message"]["text"].is_string() && single["chat"]["chat_id"].is_string(), "{single}");
    let shared = daemon.shared.clone();
    wait_open_bundles(&shared, 2, 10, "two open bundles").await;
    assert!(bundles(&rx).is_empty());

    // 16:00-17:00 window closes at 17:00 + grace (5 s).
    clock.set(T0 + (34 * 60 + 31) * 1000 + 5_000 - 1_000); // 16:59:60 + 4 s: not yet
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(bundles(&rx).is_empty(), "window not closed before end + grace");
    clock.advance(Duration::from_secs(2));
    wait_until(Duration::from_secs(30), "both bundles", || {
        let n = bundles(&rx).len();
        async move { n == 2 }
    })
    .await;
    let all = bundles(&rx);
    let a = all.iter().find(|b| b["chat"]["chat_id"] == "A").unwrap();
    let ids: Vec<&str> = a["messages"].as_array().unwrap().iter().map(|m| m["message_id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["a0", "a1", "a3"], "time order, attachment skipped");
    assert_eq!(a["first_message_timestamp"], "2021-02-24T16:25:29+0000");
    assert_eq!(a["last_message_timestamp"], "2021-02-24T16:35:29+0000");
    let summary = a["aggregation"].as_str().unwrap();
    assert_eq!(
        summary,
        "from John Doe on 2021-02-24 16:25: Xin chào<br/>from John Doe on 2021-02-24 16:30: Hi! How are you? 👋<br/>\
         from Jane &lt;b&gt;&quot;Smith&quot;&lt;/b&gt; on 2021-02-24 16:35: &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more<br/>\
         Click <a href='https://app.example.com/permalink/A'>here</a> to open the conversation in TimelinesAI"
    );
    // Emitted = the delivery record acknowledged, which can land after the receipt.
    wait_until(Duration::from_secs(10), "both bundles counted as emitted", || {
        let m = shared.metrics.render();
        async move { m.contains("hookd_bundles_emitted_total 2") }
    })
    .await;
    let m = daemon.shared.metrics.render();
    assert!(m.contains("hookd_chat_messages_skipped_total{reason=\"attachments\"} 1"), "{m}");

    // A late message for the emitted window goes to the chat's next bundle, flagged late.
    produce(&p, "chat.messages", "A", Some(&message("late", "A", T0 + 700_000, "John Doe", "late one"))).await;
    wait_open_bundles(&shared, 1, 30, "late message in an open bundle").await;
    assert_eq!(bundles(&rx).len(), 2, "the late message waits for the next window (17:00-18:00)");
    clock.advance(Duration::from_secs(3600));
    wait_until(Duration::from_secs(30), "late message in its own bundle", || {
        let n = bundles(&rx).len();
        async move { n == 3 }
    })
    .await;
    let late = bundles(&rx).into_iter().find(|b| b["messages"][0]["message_id"] == "late").expect("late bundle");
    assert_eq!(late["messages"].as_array().unwrap().len(), 1);
    assert!(daemon.shared.metrics.render().contains("hookd_chat_messages_late_total 1"));
    // The bundle is removed when the broker acknowledges its delivery record, which can land
    // after the sender already read and delivered it: the gauge follows shortly.
    wait_open_bundles(&shared, 0, 10, "no open bundle left").await;
    stop.cancel();
    daemon.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_bundles_survive_a_graceful_restart_and_close_on_time() {
    let (_mock, brokers) = mock_broker();
    let rx = Receiver::start().await;
    let state = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0 + 60_000));
    let (daemon, stop) = start(&brokers, state.path(), &rx, clock.clone()).await;
    let p = producer(&brokers);
    for i in 0..20 {
        produce(
            &p,
            "chat.messages",
            &format!("c{}", i % 5),
            Some(&message(&format!("m{i}"), &format!("c{}", i % 5), T0 + i * 1000, "John Doe", &format!("text {i}"))),
        )
        .await;
    }
    let shared = daemon.shared.clone();
    wait_open_bundles(&shared, 5, 30, "five open bundles").await;
    drop(shared);
    stop.cancel();
    daemon.wait().await.unwrap();
    assert!(bundles(&rx).is_empty());

    let (daemon, stop) = start(&brokers, state.path(), &rx, clock.clone()).await;
    assert_eq!(daemon.shared.metrics.open_bundles.get(), 5, "open bundles continue from sled");
    clock.set(T0 + 3_600_000);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(bundles(&rx).is_empty(), "not before end + grace");
    clock.set(T0 + 2 * 3_600_000);
    wait_until(Duration::from_secs(30), "five bundles", || {
        let n = bundles(&rx).len();
        async move { n == 5 }
    })
    .await;
    let total: usize = bundles(&rx).iter().map(|b| b["messages"].as_array().unwrap().len()).sum();
    assert_eq!(total, 20, "every message in exactly one bundle after a graceful restart");
    stop.cancel();
    daemon.wait().await.unwrap();
}

/// DESIGN section 2: on assignment, seek past what sled already applied. After a graceful
/// stop with open bundles, the restarted daemon reads none of the old records again (neither
/// their bundle part nor their pass-through is redone), the committed offset still sits at the
/// oldest open bundle, and new messages are bundled with the old ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_open_bundles_reads_no_old_record_again() {
    let (_mock, brokers) = mock_broker();
    let rx = Receiver::start().await;
    let state = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(T0 + 60_000));
    let (daemon, stop) = start(&brokers, state.path(), &rx, clock.clone()).await;
    let p = producer(&brokers);
    let send = |i: i64, chat: String| {
        let p = p.clone();
        async move {
            produce(&p, "chat.messages", &chat, Some(&message(&format!("m{i}"), &chat, T0 + i * 1000, "John Doe", &format!("text {i}"))))
                .await
        }
    };
    for i in 0..20 {
        send(i, format!("c{}", i % 5)).await;
    }
    let shared = daemon.shared.clone();
    wait_open_bundles(&shared, 5, 30, "five open bundles").await;
    rx.wait_for(20, Duration::from_secs(30)).await;
    drop(shared);
    stop.cancel();
    daemon.wait().await.unwrap();

    let (daemon, stop) = start(&brokers, state.path(), &rx, clock.clone()).await;
    send(20, "c0".into()).await;
    send(21, "new".into()).await;
    let shared = daemon.shared.clone();
    wait_open_bundles(&shared, 6, 30, "the new chat's bundle").await;
    let m = &daemon.shared.metrics;
    assert_eq!(m.events_consumed.with_label_values(&["chat"]).get(), 2, "only the two new messages were read");
    assert_eq!(m.resume_skipped.with_label_values(&["chat"]).get(), 20, "every old record skipped by the seek");
    clock.set(T0 + 2 * 3_600_000);
    wait_until(Duration::from_secs(30), "six bundles", || {
        let n = bundles(&rx).len();
        async move { n == 6 }
    })
    .await;
    let c0 = bundles(&rx).into_iter().find(|b| b["chat"]["chat_id"] == "c0").unwrap();
    assert_eq!(c0["messages"].as_array().unwrap().len(), 5, "old and new messages of a chat in one bundle");
    let total: usize = bundles(&rx).iter().map(|b| b["messages"].as_array().unwrap().len()).sum();
    assert_eq!(total, 22, "every message in exactly one bundle");
    let each = || rx.requests().iter().filter(|r| r.path == "/each").count();
    wait_until(Duration::from_secs(30), "pass-through of the new messages", || {
        let n = each();
        async move { n >= 22 }
    })
    .await;
    assert_eq!(each(), 22, "pass-through of the old messages not redone");
    stop.cancel();
    daemon.wait().await.unwrap();
}

/// TimelinesAI: "any non-200 is an error". A chat subscription with `success = "200"` has a
/// 201 retried (and the retry waits exactly its schedule's second: `jitter_percent = 0`),
/// while one with the dialect's rule takes the 201 as delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_subscription_can_count_only_200_as_success() {
    let (_mock, brokers) = mock_broker();
    let rx = Receiver::start().await;
    rx.set_mode(common::receiver::Mode::Status(201));
    let state = tempfile::tempdir().unwrap();
    let strict = chat_subscription("strict", TENANT, "none", &rx.url("/strict"))
        + "success = \"200\"\nretry = { delays_secs = [1], jitter_percent = 0 }\n";
    let subs = strict + &chat_subscription("lax", TENANT, "none", &rx.url("/lax"));
    let (daemon, stop) = start_daemon(config(&brokers, state.path(), &subs)).await;
    let p = producer(&brokers);
    produce(&p, "chat.messages", "A", Some(&message("m1", "A", T0, "John Doe", "hello"))).await;
    wait_until(Duration::from_secs(30), "the strict subscription's retry", || {
        let n = requests_to(&rx, "/strict").len();
        async move { n >= 2 }
    })
    .await;
    let strict = requests_to(&rx, "/strict");
    assert_eq!(strict[0].body, strict[1].body, "the same message again");
    assert_eq!(requests_to(&rx, "/lax").len(), 1, "201 delivered it");
    let m = daemon.shared.metrics.render();
    assert!(m.contains("hookd_deliveries_total{outcome=\"success\"} 1"), "{m}");
    assert!(daemon.shared.metrics.request_errors.with_label_values(&["status"]).get() >= 1, "{m}");
    let error = daemon.shared.endpoints.state("strict").unwrap().last_error.unwrap_or_default();
    assert_eq!(error, "HTTP status 201 is not a success for this subscription (success = \"200\")");
    stop.cancel();
    daemon.wait().await.unwrap();
}
