//! Chat bundles on the customer's clock, on the mock cluster with a manual clock: a 24 h
//! window in `Europe/Berlin` is the local day (25 h on the last Sunday of October), 1 h
//! windows in `Asia/Kathmandu` (+05:45) are local hours, the summaries show local times, and
//! open zoned bundles survive a restart and close on their local schedule.

mod common;

use std::sync::Arc;
use std::time::Duration;

use chrono::NaiveDate;
use common::chat::*;
use common::receiver::Receiver;
use common::*;
use hookd::window::clock::ManualClock;
use serde_json::Value;

/// Epoch ms of a UTC date and time.
fn utc(y: i32, m: u32, d: u32, h: u32, min: u32) -> i64 {
    NaiveDate::from_ymd_opt(y, m, d).unwrap().and_hms_opt(h, min, 0).unwrap().and_utc().timestamp_millis()
}

/// A 24 h subscription in Berlin (tenant `berlin`) and a 1 h one in Kathmandu (tenant `ktm`).
fn subscriptions(rx: &Receiver) -> String {
    [("berlin", "24h", "Europe/Berlin"), ("ktm", "1h", "Asia/Kathmandu")]
        .map(|(tenant, aggregation, zone)| {
            chat_subscription(tenant, tenant, aggregation, &rx.url(&format!("/{tenant}"))) + &format!("timezone = \"{zone}\"\n")
        })
        .concat()
}

/// The bundles `path` received, parsed, in arrival order.
fn received(rx: &Receiver, path: &str) -> Vec<Value> {
    requests_to(rx, path).iter().map(|r| serde_json::from_slice(&r.body).unwrap()).collect()
}

/// The `on <time>` of each summary line.
fn summary_times(bundle: &Value) -> Vec<String> {
    let summary = bundle["aggregation"].as_str().unwrap();
    summary.split("<br/>").filter_map(|line| line.split_once(" on ")).map(|(_, rest)| rest[..16].to_string()).collect()
}

async fn wait_received(rx: &Receiver, path: &str, n: usize, what: &str) {
    wait_until(Duration::from_secs(30), what, || {
        let got = requests_to(rx, path).len();
        async move { got >= n }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_follow_the_local_clock_across_a_dst_change_and_a_restart() {
    let (_mock, brokers) = mock_broker();
    let rx = Receiver::start().await;
    let state = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(utc(2024, 10, 26, 21, 0)));
    let (daemon, stop) = start_on_clock(config(&brokers, state.path(), &subscriptions(&rx)), clock.clone()).await;
    let p = producer(&brokers);
    // Berlin: Saturday 23:30; Sunday 00:30 +0200, 02:30 +0100 (the hour that comes twice),
    // 23:59 +0100 (24.5 h after 00:30); Monday 00:30.
    let berlin = [("b1", (26, 21, 30)), ("b2", (26, 22, 30)), ("b3", (27, 1, 30)), ("b4", (27, 22, 59)), ("b5", (27, 23, 30))];
    // Kathmandu: 04:55 and 04:05 +0545 are one UTC hour (22:xx) but two local ones;
    // 04:35 and 04:55 are two UTC hours but one local one.
    let ktm = [("k1", (26, 22, 10)), ("k2", (26, 22, 20)), ("k3", (26, 22, 50)), ("k4", (26, 23, 10))];
    for (tenant, chat, messages) in [("berlin", "B", &berlin[..]), ("ktm", "K", &ktm[..])] {
        for (id, (day, h, min)) in messages {
            produce(&p, "chat.messages", chat, Some(&message_of(tenant, id, chat, utc(2024, 10, *day, *h, *min), "John Doe", id))).await;
        }
    }
    wait_open_bundles(&daemon.shared, 5, 30, "3 Berlin days and 2 Kathmandu hours open").await;

    // Berlin's Saturday ends at 22:00 UTC (midnight +0200); plus the 5 s grace.
    clock.set(utc(2024, 10, 26, 22, 0) + 6_000);
    wait_received(&rx, "/berlin", 1, "Berlin's Saturday").await;
    let saturday = &received(&rx, "/berlin")[0];
    assert_eq!((message_ids(saturday), summary_times(saturday)), (vec!["b1".to_string()], vec!["2024-10-26 23:30".to_string()]));
    assert_eq!(saturday["first_message_timestamp"], "2024-10-26T21:30:00+0000", "the body's timestamps stay UTC");
    wait_open_bundles(&daemon.shared, 4, 10, "Saturday removed").await;

    // Restarted with the store intact: the zoned bundles are the same and close on time.
    stop.cancel();
    daemon.wait().await.unwrap();
    let (daemon, stop) = start_on_clock(config(&brokers, state.path(), &subscriptions(&rx)), clock.clone()).await;
    wait_open_bundles(&daemon.shared, 4, 10, "Sunday, Monday and two Kathmandu hours kept").await;
    // Sunday is 25 hours long: it ends at 23:00 UTC (midnight +0100).
    clock.set(utc(2024, 10, 27, 23, 0) + 6_000);
    wait_received(&rx, "/berlin", 2, "Berlin's Sunday").await;
    wait_received(&rx, "/ktm", 2, "both Kathmandu hours").await;
    let sunday = &received(&rx, "/berlin")[1];
    assert_eq!(message_ids(sunday), ["b2", "b3", "b4"], "00:30 +0200 to 23:59 +0100, Monday's message apart");
    assert_eq!(summary_times(sunday), ["2024-10-27 00:30", "2024-10-27 02:30", "2024-10-27 23:59"]);
    let mut hours = received(&rx, "/ktm");
    hours.sort_by_key(|b| b["first_message_timestamp"].as_str().unwrap().to_string());
    assert_eq!((message_ids(&hours[0]), message_ids(&hours[1])), (vec!["k1".to_string()], ["k2", "k3", "k4"].map(String::from).to_vec()));
    assert_eq!(summary_times(&hours[1]), ["2024-10-27 04:05", "2024-10-27 04:35", "2024-10-27 04:55"]);
    wait_open_bundles(&daemon.shared, 1, 10, "only Berlin's Monday left").await;
    assert_eq!(requests_to(&rx, "/berlin").len(), 2, "Monday is still open");
    stop.cancel();
    daemon.wait().await.unwrap();
}
