//! The `hookd` command line: `check-config` answers 0 for good files and names the bad key
//! otherwise.

use std::process::Command;

fn hookd(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hookd")).args(args).output().expect("hookd runs");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn check_config_accepts_the_shipped_file() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/hookd.toml");
    let (ok, stdout, stderr) = hookd(&["check-config", path]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("ok"), "{stdout}");
    assert!(stdout.contains("limits: input records up to 1048576 bytes"), "the chain of limits is shown: {stdout}");
}

#[test]
fn check_config_refuses_limits_that_do_not_fit_together_naming_both_keys() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        // 2,000,000 bytes of input: up to 2,683,052 bytes of delivery record, over the 2 MiB default.
        ("[ingest]\nmax_record_bytes = 2000000\n", "ingest.max_record_bytes"),
        // The 1 MiB default input against librdkafka's own default producer limit.
        ("[kafka]\nmax_message_bytes = 1000000\n", "ingest.max_record_bytes"),
        // Small inputs, but bundle parts of the default 512 KiB do not fit 200,000 bytes.
        ("[kafka]\nmax_message_bytes = 200000\n[ingest]\nmax_record_bytes = 100000\n", "chat.max_bundle_bytes"),
    ];
    for (i, (text, first)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("limits{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let (ok, _, stderr) = hookd(&["check-config", path.to_str().unwrap()]);
        assert!(!ok, "{text} must be refused");
        for key in [*first, "kafka.max_message_bytes"] {
            assert!(stderr.contains(key), "error for {text:?} should name `{key}`: {stderr}");
        }
    }
}

#[test]
fn check_config_names_the_bad_key_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[kafka]\nbrokers = \"x:1\"\ngroupid = \"g\"\n", "groupid"),
        ("[delivery]\nallow_private_targets = [\"not-a-cidr\"]\n", "allow_private_targets"),
        ("[[subscription]]\nid = \"s\"\ntenant = \"t\"\nurl = \"http://h/\"\ndialect = \"nosuch\"\n", "nosuch"),
        ("[admin]\nlisten = \"nowhere\"\n", "listen"),
    ];
    for (i, (text, key)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let (ok, _, stderr) = hookd(&["check-config", path.to_str().unwrap()]);
        assert!(!ok, "{text} must be refused");
        assert!(stderr.contains(key), "error for {text:?} should name `{key}`: {stderr}");
    }
    let (ok, _, stderr) = hookd(&["check-config", "/nonexistent/hookd.toml"]);
    assert!(!ok && stderr.contains("cannot read"), "{stderr}");
}
