//! A client of the admin API for the integration tests.
#![allow(dead_code)]

use serde_json::Value;

/// The admin token of [`super::config`].
pub const TOKEN: &str = "t";

/// A client of the admin API of a daemon started in process.
pub struct Api {
    base: String,
    client: reqwest::Client,
}

impl Api {
    pub fn new(daemon: &hookd::Running) -> Self {
        Self { base: format!("http://{}", daemon.admin), client: reqwest::Client::new() }
    }

    /// Sends a request; answers (status, JSON body or the text as a string, headers).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        token: Option<&str>,
    ) -> (u16, Value, reqwest::header::HeaderMap) {
        let mut req = self.client.request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b.to_string());
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)), headers)
    }

    /// GET with the token; asserts 200.
    pub async fn get(&self, path: &str) -> Value {
        let (status, v, _) = self.call("GET", path, None, Some(TOKEN)).await;
        assert_eq!(status, 200, "GET {path}: {v}");
        v
    }

    /// POST with the token; asserts 200.
    pub async fn post(&self, path: &str, body: Option<Value>) -> Value {
        let (status, v, _) = self.call("POST", path, body, Some(TOKEN)).await;
        assert_eq!(status, 200, "POST {path}: {v}");
        v
    }
}
