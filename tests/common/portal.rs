//! A client of the customer portal for the integration tests: links from the admin API,
//! pages, and form posts as a browser sends them.
#![allow(dead_code)]

use super::api::{Api, TOKEN};

/// The `portal.secret` of [`SECTION`].
pub const SECRET: &str = "test-portal-secret-0123456789abcdef";
/// A `[portal]` table for [`super::config`]'s `extra`.
pub const SECTION: &str = "[portal]\nsecret = \"test-portal-secret-0123456789abcdef\"\n";

/// A portal answer: status, `Location` (of a redirect) and body.
#[derive(Debug)]
pub struct Page {
    pub status: u16,
    pub location: Option<String>,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl Page {
    /// The CSRF token in the page's forms.
    pub fn csrf(&self) -> String {
        let at = self.body.find("name=\"csrf\" value=\"").expect("a form with a CSRF token") + "name=\"csrf\" value=\"".len();
        self.body[at..at + self.body[at..].find('"').unwrap()].to_string()
    }
}

/// The portal of a daemon started in process; follows no redirects, so tests see them.
pub struct Portal {
    pub base: String,
    client: reqwest::Client,
    api: Api,
}

impl Portal {
    pub fn new(daemon: &hookd::Running) -> Self {
        let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
        Self { base: format!("http://{}", daemon.admin), client, api: Api::new(daemon) }
    }

    /// A link to `tenant`'s page from the admin API, as its path (`/portal/<token>`).
    pub async fn link(&self, tenant: &str) -> String {
        let v = self.api.post(&format!("/api/tenants/{tenant}/portal-link"), None).await;
        let url = v["url"].as_str().unwrap();
        assert!(url.starts_with(&self.base), "{url}");
        url[self.base.len()..].to_string()
    }

    pub async fn get(&self, path: &str) -> Page {
        Self::page(self.client.get(format!("{}{path}", self.base)).send().await.unwrap()).await
    }

    /// A form post as a browser sends it from the portal's own page.
    pub async fn post(&self, path: &str, form: &[(&str, &str)]) -> Page {
        self.post_with(path, form, &[("origin", &self.base), ("sec-fetch-site", "same-origin")]).await
    }

    /// A form post with the given headers (none added).
    pub async fn post_with(&self, path: &str, form: &[(&str, &str)], headers: &[(&str, &str)]) -> Page {
        let body: String = url::form_urlencoded::Serializer::new(String::new()).extend_pairs(form).finish();
        let mut req = self.client.post(format!("{}{path}", self.base)).header("content-type", "application/x-www-form-urlencoded");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Self::page(req.body(body).send().await.unwrap()).await
    }

    async fn page(resp: reqwest::Response) -> Page {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let location = headers.get("location").map(|l| l.to_str().unwrap().to_string());
        Page { status, location, headers, body: resp.text().await.unwrap() }
    }

    /// The subscription's state as the admin API says it.
    pub async fn api_state(&self, id: &str) -> (String, serde_json::Value) {
        let (status, v, _) = self.api.call("GET", &format!("/api/subscriptions/{id}"), None, Some(TOKEN)).await;
        assert_eq!(status, 200, "{v}");
        (v["state"].as_str().unwrap().to_string(), v)
    }
}
