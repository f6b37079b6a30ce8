//! Cross-checks our Standard Webhooks signatures with an independent implementation
//! (the `standardwebhooks` crate), without HTTP in between.

use hookd::deliver::signature::sign;
use reqwest::header::{HeaderMap, HeaderValue};
use standardwebhooks::Webhook;

fn headers(id: &str, ts: i64, signature: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("webhook-id", HeaderValue::from_str(id).unwrap());
    h.insert("webhook-timestamp", HeaderValue::from_str(&ts.to_string()).unwrap());
    h.insert("webhook-signature", HeaderValue::from_str(signature).unwrap());
    h
}

#[test]
fn independent_verifier_accepts_ours_and_rejects_tampering() {
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let wh = Webhook::new(secret).unwrap();
    let ts = chrono::Utc::now().timestamp();
    let body = r#"{"aggregation":"from Tran on 2021-02-24 16:25: xin chào <b>ạ</b>"}"#.as_bytes();
    let sig = sign(Some(secret), "msg_2", ts, body);
    wh.verify(body, &headers("msg_2", ts, &sig)).expect("verifies");

    assert!(wh.verify(b"{}", &headers("msg_2", ts, &sig)).is_err(), "other body");
    assert!(wh.verify(body, &headers("msg_3", ts, &sig)).is_err(), "other id");
    assert!(wh.verify(body, &headers("msg_2", ts - 1, &sig)).is_err(), "other timestamp");
}

#[test]
fn signatures_match_the_reference_signer_for_each_rotated_secret() {
    let secrets = ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "C2FVsBQIhrscChlQIMV+b5sSYspob7oD"];
    let ours = sign(Some(&secrets.join(" ")), "msg_x", 1_700_000_000, b"payload");
    let theirs: Vec<String> = secrets.iter().map(|s| Webhook::new(s).unwrap().sign("msg_x", 1_700_000_000, b"payload").unwrap()).collect();
    assert_eq!(ours, theirs.join(" "));
}
