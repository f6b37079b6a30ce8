//! Config parsing, defaults and validation; every file in `config/` parses.

use super::*;

const MINIMAL: &str = r#"
[kafka]
brokers = "127.0.0.1:9092"      # bootstrap servers
group_id = "hookd"
[state]
path = "data/hookd"             # sled directory
[admin]
listen = "127.0.0.1:9464"
token = "change-me"
[delivery]
allow_private_targets = []
"#;

#[test]
fn design_minimal_file_runs_with_defaults() {
    let c = Config::parse(MINIMAL).unwrap();
    assert_eq!(c.kafka.partitions, 6);
    assert_eq!(c.topics.dlq, "hookd.dlq");
    assert_eq!(c.delivery.request_timeout_ms, 10_000);
    assert_eq!(c.admin.produce_timeout_ms, 10_000);
    assert!(c.subscription.is_empty());
    assert_eq!((c.chat.max_bundle_bytes, c.chat.max_bundle_messages), (524_288, 0));
    assert_eq!(c.chat.max_bundle_record_body_bytes(), 699_052, "base64 of 512 KiB, under 1,000,000 with room for the record");
}

#[test]
fn unknown_key_is_named() {
    let err = Config::parse("[kafka]\nbrokerz = \"x\"\n").unwrap_err().to_string();
    assert!(err.contains("brokerz"), "{err}");
    let err = Config::parse("[nonsense]\n").unwrap_err().to_string();
    assert!(err.contains("nonsense"), "{err}");
}

#[test]
fn cross_field_errors_are_clear() {
    let err = Config::parse("[delivery]\nallow_private_targets = [\"10.0.0.0/99\"]\n").unwrap_err().to_string();
    assert!(err.contains("allow_private_targets"), "{err}");
    let dup = "[[subscription]]\nid=\"a\"\ntenant=\"t\"\nurl=\"http://x/\"\n[[subscription]]\nid=\"a\"\ntenant=\"t\"\nurl=\"http://y/\"\n";
    assert!(Config::parse(dup).unwrap_err().to_string().contains("twice"));
    let no_timeout = Config::parse("[admin]\nproduce_timeout_ms = 0\n").unwrap_err().to_string();
    assert!(no_timeout.contains("admin.produce_timeout_ms"), "{no_timeout}");
    let small = Config::parse("[chat]\nmax_bundle_bytes = 1000\n").unwrap_err().to_string();
    assert!(small.contains("chat.max_bundle_bytes must be at least 4096"), "{small}");
    let bad_dialect = "[[subscription]]\nid=\"a\"\ntenant=\"t\"\nurl=\"http://x/\"\ndialect=\"nope\"\n";
    assert!(Config::parse(bad_dialect).unwrap_err().to_string().contains("nope"));
}

#[test]
fn every_shipped_config_file_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
            n += 1;
        }
    }
    assert!(n >= 1, "no config files found in {}", dir.display());
}

#[test]
fn instance_id_becomes_the_static_member_id_and_is_validated() {
    let c = Config::parse("[kafka]\ninstance_id = \"hookd-0\"\n").unwrap();
    let consumer = crate::kafka::consumer_config(&c, "g");
    assert_eq!(consumer.get("group.instance.id"), Some("hookd-0"));
    assert_eq!(consumer.get("partition.assignment.strategy"), Some("cooperative-sticky"));
    let none = crate::kafka::consumer_config(&Config::parse("").unwrap(), "g");
    assert_eq!(none.get("group.instance.id"), None, "no static membership unless asked for");
    let bad = Config::parse("[kafka]\ninstance_id = \"pod 0\"\n").unwrap_err().to_string();
    assert!(bad.contains("kafka.instance_id `pod 0`"), "{bad}");
    let twice = "[kafka]\ninstance_id = \"a\"\n[kafka.librdkafka]\n\"group.instance.id\" = \"b\"\n";
    assert!(Config::parse(twice).unwrap_err().to_string().contains("both set"));
}
