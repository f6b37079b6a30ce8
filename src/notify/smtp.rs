//! `[notify.smtp]`: the SMTP relay that owner e-mails go through (lettre on tokio, rustls with
//! the Mozilla roots of `webpki-roots`), and the e-mail an `endpoint.disabled` notice becomes.

use std::time::Duration;

use lettre::message::{header::ContentType, Mailbox};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::TlsParameters;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::{Deserialize, Serialize};

use super::{DisableCause, Notice};

/// How the connection to the relay is protected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Plain SMTP (a relay on the same host or network); no credentials allowed.
    None,
    /// Plain connection upgraded with STARTTLS, which must succeed (port 587 by default).
    #[default]
    Starttls,
    /// TLS from the first byte, "SMTPS" (port 465 by default).
    Tls,
}

/// `[notify.smtp]`. `host` and `from` are required; the rest have defaults.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpConfig {
    /// The relay's host name (checked against its TLS certificate) or address.
    pub host: String,
    /// Default by `tls`: 25 for none, 587 for starttls, 465 for tls.
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub tls: TlsMode,
    /// SMTP AUTH, when the relay wants it: both or neither, and not with `tls = "none"`.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default, skip_serializing)]
    pub password: Option<String>,
    /// The sender, `hookd@example.com` or `"Webhooks <hookd@example.com>"`.
    pub from: String,
    /// Longest wait for one e-mail (connection and each SMTP command); then it counts as failed.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// E-mails waiting to be sent; one more while it is full is dropped (and counted).
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Which disables are mailed: `failures` and `gone` by default (hookd's own decisions), not
    /// `operator` (someone chose to, through the admin API or the portal, and knows).
    #[serde(default = "default_causes")]
    pub causes: Vec<DisableCause>,
}

fn default_timeout_ms() -> u64 {
    10_000
}

fn default_queue() -> usize {
    1_000
}

fn default_causes() -> Vec<DisableCause> {
    vec![DisableCause::Failures, DisableCause::Gone]
}

impl SmtpConfig {
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(match self.tls {
            TlsMode::None => 25,
            TlsMode::Starttls => 587,
            TlsMode::Tls => 465,
        })
    }

    /// Cross-field checks; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.host.trim().is_empty() || self.host.contains(char::is_whitespace) {
            return Err(format!("notify.smtp.host `{}` is not a host name", self.host));
        }
        self.from.parse::<Mailbox>().map_err(|e| format!("notify.smtp.from `{}` is not an e-mail address: {e}", self.from))?;
        if self.port == Some(0) {
            return Err("notify.smtp.port must not be 0".into());
        }
        match (&self.username, &self.password) {
            (Some(_), None) | (None, Some(_)) => return Err("notify.smtp.username and notify.smtp.password go together".into()),
            (Some(_), Some(_)) if self.tls == TlsMode::None => {
                return Err(
                    "notify.smtp.username/password need tls = \"starttls\" or \"tls\": the password would cross the network in clear"
                        .into(),
                )
            }
            _ => {}
        }
        if self.timeout_ms == 0 || self.queue == 0 {
            return Err("notify.smtp.timeout_ms and notify.smtp.queue must be at least 1".into());
        }
        if self.tls != TlsMode::None {
            TlsParameters::new(self.host.clone()).map_err(|e| format!("notify.smtp.host `{}` cannot be used for TLS: {e}", self.host))?;
        }
        Ok(())
    }
}

/// Why an owner e-mail was not sent.
#[derive(Debug, thiserror::Error)]
pub enum MailError {
    #[error("`{address}` is not an e-mail address: {source}")]
    Address { address: String, source: lettre::address::AddressError },
    #[error("building the e-mail: {0}")]
    Build(#[from] lettre::error::Error),
    #[error("SMTP: {0}")]
    Smtp(#[from] lettre::transport::smtp::Error),
    #[error("no answer from the SMTP relay within {0} ms")]
    Timeout(u64),
}

/// A pooled connection to the relay and the sender's address.
pub struct Sender {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    timeout: Duration,
}

impl Sender {
    /// Builds the transport (connects only when the first e-mail is sent). Needs a runtime.
    pub fn new(c: &SmtpConfig) -> Result<Self, MailError> {
        let from: Mailbox = c.from.parse().map_err(|source| MailError::Address { address: c.from.clone(), source })?;
        let timeout = Duration::from_millis(c.timeout_ms);
        let builder = match c.tls {
            TlsMode::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&c.host),
            TlsMode::Starttls => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&c.host)?,
            TlsMode::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&c.host)?,
        };
        let mut builder = builder.port(c.port()).timeout(Some(timeout));
        if let (Some(user), Some(password)) = (&c.username, &c.password) {
            builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
        }
        Ok(Self { transport: builder.build(), from, timeout })
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Mails `notice` to its `owner_email`, within the timeout.
    pub async fn send(&self, notice: &Notice) -> Result<(), MailError> {
        let message = message(&self.from, notice)?;
        match tokio::time::timeout(self.timeout, self.transport.send(message)).await {
            Ok(sent) => sent.map(drop).map_err(MailError::from),
            Err(_) => Err(MailError::Timeout(self.timeout.as_millis() as u64)),
        }
    }
}

/// The e-mail for `notice`: to its `owner_email`, plain text naming the subscription, the
/// endpoint, why it was disabled and what happens now.
pub fn message(from: &Mailbox, notice: &Notice) -> Result<Message, MailError> {
    let address = notice.owner_email.clone().unwrap_or_default();
    let to: Mailbox = address.trim().parse().map_err(|source| MailError::Address { address: address.clone(), source })?;
    // Header values on one line: a subscription id is the caller's text.
    let subject: String =
        format!("Webhook endpoint disabled: {}", notice.subscription).chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    let body = format!(
        "hookd disabled your webhook endpoint: nothing is sent to it until it\n\
         is enabled again.\n\n\
         Subscription: {}\nTenant:       {}\nURL:          {}\nReason:       {}\nLast error:   {}\nDisabled at:  {}\n\n\
         Deliveries already waiting for a retry are kept and resume once the\n\
         endpoint is enabled again; events that occur while it is disabled\n\
         are not sent to it.\n",
        notice.subscription, notice.tenant, notice.url, notice.reason, notice.last_error, notice.at
    );
    Ok(Message::builder().from(from.clone()).to(to).subject(subject).header(ContentType::TEXT_PLAIN).body(body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smtp(extra: &str) -> Result<SmtpConfig, String> {
        let c: SmtpConfig =
            toml::from_str(&format!("host = \"smtp.example.com\"\nfrom = \"hookd@example.com\"\n{extra}")).map_err(|e| e.to_string())?;
        c.validate().map(|()| c)
    }

    #[test]
    fn defaults_and_ports_follow_the_tls_mode() {
        let c = smtp("").unwrap();
        assert_eq!((c.tls, c.port(), c.timeout_ms, c.queue), (TlsMode::Starttls, 587, 10_000, 1_000));
        assert_eq!(c.causes, [DisableCause::Failures, DisableCause::Gone]);
        assert_eq!(smtp("tls = \"tls\"").unwrap().port(), 465);
        assert_eq!(smtp("tls = \"none\"").unwrap().port(), 25);
        assert_eq!(smtp("tls = \"none\"\nport = 2525").unwrap().port(), 2525);
    }

    #[test]
    fn bad_settings_are_named() {
        let err = |extra: &str| smtp(extra).unwrap_err();
        assert!(err("tls = \"ssl\"").contains("unknown variant `ssl`"), "{}", err("tls = \"ssl\""));
        assert!(err("username = \"u\"").contains("username and notify.smtp.password go together"));
        assert!(err("tls = \"none\"\nusername = \"u\"\npassword = \"p\"").contains("in clear"));
        assert!(err("timeout_ms = 0").contains("timeout_ms"));
        assert!(err("causes = [\"sometimes\"]").contains("sometimes"));
        assert!(err("hosts = \"x\"").contains("hosts"));
        let from: SmtpConfig = toml::from_str("host = \"h\"\nfrom = \"not an address\"").unwrap();
        assert!(from.validate().unwrap_err().contains("notify.smtp.from `not an address` is not an e-mail address"));
        let host: SmtpConfig = toml::from_str("host = \"a b\"\nfrom = \"x@example.com\"").unwrap();
        assert!(host.validate().unwrap_err().contains("notify.smtp.host"));
        assert!(toml::from_str::<SmtpConfig>("host = \"h\"").unwrap_err().to_string().contains("from"));
    }

    #[test]
    fn the_example_in_config_hookd_toml_is_valid() {
        let file = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/hookd.toml")).unwrap();
        let block: String = file
            .lines()
            .skip_while(|l| *l != "# [notify.smtp]")
            .take_while(|l| l.starts_with('#'))
            .map(|l| format!("{}\n", l.trim_start_matches('#').trim_start()))
            .collect();
        assert!(block.contains("host = "), "no [notify.smtp] example in config/hookd.toml");
        let config = crate::config::Config::parse(&block).unwrap_or_else(|e| panic!("{e}\n{block}"));
        let smtp = config.notify.smtp.unwrap();
        assert_eq!((smtp.port(), smtp.tls, smtp.causes.len()), (587, TlsMode::Starttls, 2));
    }

    #[tokio::test]
    async fn every_tls_mode_builds_a_transport() {
        for mode in ["none", "starttls", "tls"] {
            Sender::new(&smtp(&format!("tls = \"{mode}\"")).unwrap()).unwrap_or_else(|e| panic!("{mode}: {e}"));
        }
    }

    #[test]
    fn the_message_names_the_subscription_and_the_reason_on_one_subject_line() {
        let notice = Notice {
            kind: "endpoint.disabled",
            tenant: "t1".into(),
            subscription: "sub\r\nBcc: evil@example.com".into(),
            url: "https://hooks.example.com/x".into(),
            owner_email: Some("owner@example.com".into()),
            last_error: "endpoint answered HTTP 500".into(),
            cause: DisableCause::Failures,
            reason: "11 consecutive failed requests".into(),
            at: "2026-12-02T00:00:00+00:00".into(),
        };
        let text = String::from_utf8(message(&"hookd@example.com".parse().unwrap(), &notice).unwrap().formatted()).unwrap();
        assert!(text.contains("To: owner@example.com\r\n"), "{text}");
        assert!(text.contains("Subject: Webhook endpoint disabled: sub  Bcc: evil@example.com\r\n"), "{text}");
        let head = text.split("\r\n\r\n").next().unwrap();
        assert!(!head.contains("\r\nBcc:"), "no header of the caller's making: {text}");
        assert!(text.contains("11 consecutive failed requests") && text.contains("https://hooks.example.com/x"), "{text}");
        let bad = Notice { owner_email: Some("nobody".into()), ..notice };
        assert!(matches!(message(&"hookd@example.com".parse().unwrap(), &bad), Err(MailError::Address { .. })));
    }
}
