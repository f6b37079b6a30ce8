//! The customer portal in a real browser: Debian's headless Chromium, driven over WebDriver
//! (Debian's chromedriver, the `fantoccini` client), at a phone's width. It clicks Disable
//! and Enable and checks each change on the page and through the admin API.
//!
//! Needs the `chromium` and `chromium-driver` packages (`.ci/run` installs them); without them
//! the test fails saying so. `CHROMEDRIVER` and `CHROME` override the binaries' paths.
//! `HOOKD_SCREENSHOT=docs/portal.png` saves a screenshot of the page (path relative to the
//! crate) after the clicks.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::portal::{Portal, SECTION};
use common::receiver::Receiver;
use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

/// Phone-sized viewport (CSS pixels), as a mid-size Android phone.
const PHONE: (u32, u32) = (412, 915);
/// Longest wait for any one browser step.
const STEP: Duration = Duration::from_secs(20);

/// `name` from the environment variable `var`, else the first of `candidates` found on PATH
/// or as an absolute path; None when none exists.
fn binary(var: &str, candidates: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(var) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    candidates.iter().find_map(|c| {
        let c = Path::new(c);
        if c.is_absolute() {
            return c.is_file().then(|| c.to_path_buf());
        }
        std::env::split_paths(&path).map(|d| d.join(c)).find(|p| p.is_file())
    })
}

/// A chromedriver process in a process group of its own, with the browsers it starts: killed,
/// group and all, when dropped (also when the test panics).
struct Driver {
    child: Child,
    port: u16,
    profile: tempfile::TempDir,
}

impl Driver {
    fn start() -> Self {
        const MISSING: &str = "the portal's browser test needs Debian's `chromium` and `chromium-driver` packages \
                               (apt-get install chromium chromium-driver; .ci/run installs them), or CHROMEDRIVER and CHROME set";
        let driver = binary("CHROMEDRIVER", &["chromedriver", "/usr/lib/chromium/chromedriver"])
            .unwrap_or_else(|| panic!("chromedriver not found: {MISSING}"));
        let port = free_port();
        let profile = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(profile.path().join("chromedriver.log")).unwrap();
        let child = Command::new(&driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("{} does not start ({e}): {MISSING}", driver.display()));
        Self { child, port, profile }
    }

    /// Waits until chromedriver answers `/status` ready.
    async fn ready(&self) {
        let url = format!("http://127.0.0.1:{}/status", self.port);
        let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
        wait_until(STEP, "chromedriver answering /status ready", || {
            let req = client.get(&url).send();
            async move {
                match req.await {
                    Ok(r) => {
                        let body = r.text().await.unwrap_or_default();
                        serde_json::from_str::<serde_json::Value>(&body).is_ok_and(|v| v["value"]["ready"] == true)
                    }
                    Err(_) => false,
                }
            }
        })
        .await;
    }

    /// A headless Chromium session at a phone's width.
    async fn session(&self) -> Client {
        let chrome = binary("CHROME", &["chromium", "/usr/lib/chromium/chromium", "chromium-browser"])
            .unwrap_or_else(|| panic!("chromium not found: install Debian's `chromium` package (.ci/run does), or set CHROME"));
        let args = [
            "--headless=new".to_string(),
            "--no-sandbox".into(), // CI runs as root
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--no-first-run".into(),
            "--hide-scrollbars".into(),
            format!("--user-data-dir={}", self.profile.path().join("profile").display()),
        ];
        let mut caps = serde_json::Map::new();
        // A desktop window is at least 500 px wide: emulate the phone's screen instead.
        let phone = json!({ "deviceMetrics": { "width": PHONE.0, "height": PHONE.1, "pixelRatio": 2.0, "touch": true } });
        caps.insert("goog:chromeOptions".into(), json!({ "binary": chrome, "args": args, "mobileEmulation": phone }));
        let mut builder = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
        builder.capabilities(caps);
        let url = format!("http://127.0.0.1:{}", self.port);
        let connect = builder.connect(&url);
        match tokio::time::timeout(Duration::from_secs(60), connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => panic!("no browser session from chromedriver: {e}\n{}", self.log()),
            Err(_) => panic!("chromedriver did not open a browser session within 60 s\n{}", self.log()),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.profile.path().join("chromedriver.log")).unwrap_or_default()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The group holds chromedriver and every browser process it started.
        let pgid = self.child.id() as libc::pid_t;
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// Waits for `css` on the page and returns its text.
async fn text(c: &Client, css: &str) -> String {
    let el = c.wait().at_most(STEP).for_element(Locator::Css(css)).await.unwrap_or_else(|e| panic!("no `{css}` on the page: {e}"));
    el.text().await.unwrap()
}

/// Clicks the button `css` (a form post that answers with a redirect to the page) and waits
/// until the page shows `then`.
async fn click(c: &Client, css: &str, then: &str) {
    let button = c.wait().at_most(STEP).for_element(Locator::Css(css)).await.unwrap_or_else(|e| panic!("no `{css}`: {e}"));
    button.click().await.unwrap_or_else(|e| panic!("clicking `{css}`: {e}"));
    if let Err(e) = c.wait().at_most(STEP).for_element(Locator::Css(then)).await {
        let (url, page) = (c.current_url().await.map(|u| u.to_string()), c.source().await.unwrap_or_default());
        panic!("after clicking `{css}`, no `{then}` ({e}); the browser is at {url:?}:\n{page}");
    }
}

async fn no_sideways_scrolling(c: &Client) {
    let v = c.execute("return [document.documentElement.scrollWidth, window.innerWidth];", vec![]).await.unwrap();
    let (scroll, inner) = (v[0].as_u64().unwrap(), v[1].as_u64().unwrap());
    assert!(inner <= PHONE.0 as u64 && scroll <= inner, "the page is {scroll} px wide in a {inner} px window");
}

async fn save_screenshot(c: &Client) {
    let Some(path) = std::env::var_os("HOOKD_SCREENSHOT") else { return };
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::write(&path, c.screenshot().await.unwrap()).unwrap();
    eprintln!("screenshot saved to {}", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_and_enable_in_a_real_browser() {
    let driver = Driver::start();
    let (_mock, brokers) = mock_broker();
    let (rx, state) = (Receiver::start().await, tempfile::tempdir().unwrap());
    let subs = format!(
        "[[subscription]]\nid = \"crm-main\"\ntenant = \"acme\"\nurl = \"{}\"\nevents = [\"contact.*\", \"order.created\"]\n\
         [[subscription]]\nid = \"whatsapp-digest\"\ntenant = \"acme\"\nurl = \"{}\"\nsource = \"chat\"\naggregation = \"24h\"\ndialect = \"timelines\"\n{SECTION}",
        rx.url("/hooks/crm"),
        rx.url("/hooks/chat"),
    );
    let (daemon, stop) = start_daemon(config(&brokers, state.path(), &subs)).await;
    produce(&producer(&brokers), "crm.events", "acme", Some(&crm_event("e1", "acme", "contact.created", json!({"contact": {"id": 1}}))))
        .await;
    wait_until(Duration::from_secs(30), "the first delivery", || {
        let n = rx.requests().len();
        async move { n == 1 }
    })
    .await;
    let portal = Portal::new(&daemon);
    let link = format!("{}{}", portal.base, portal.link("acme").await);
    driver.ready().await;
    let c = driver.session().await;
    let flow = async {
        c.goto(&link).await.unwrap();
        assert_eq!(text(&c, "[data-sub=\"crm-main\"] .state").await, "active");
        no_sideways_scrolling(&c).await;
        click(&c, "[data-sub=\"crm-main\"] button.disable", "[data-sub=\"crm-main\"] [data-state=\"disabled\"]").await;
        assert!(text(&c, ".notice").await.contains("crm-main is disabled"));
        assert_eq!(portal.api_state("crm-main").await.0, "disabled", "the admin API agrees");
        assert_eq!(portal.api_state("whatsapp-digest").await.0, "active", "the other subscription untouched");
        click(&c, "[data-sub=\"crm-main\"] button.enable", "[data-sub=\"crm-main\"] [data-state=\"active\"]").await;
        assert!(text(&c, ".notice").await.contains("crm-main is enabled"));
        assert_eq!(portal.api_state("crm-main").await.0, "active", "the admin API agrees");
        assert!(text(&c, "[data-sub=\"crm-main\"] .activity").await.contains("enabled"));
        no_sideways_scrolling(&c).await;
        save_screenshot(&c).await;
    };
    tokio::time::timeout(Duration::from_secs(120), flow).await.expect("the browser steps finished within 120 s");
    let _ = tokio::time::timeout(Duration::from_secs(10), c.close()).await;
    drop(driver);
    stop.cancel();
    daemon.wait().await.unwrap();
}
