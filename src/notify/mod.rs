//! Owner notices: the `endpoint.disabled` notice ([`Notice`]) that hookd writes to
//! `hookd.notifications` when it disables a subscription and, when `[notify.smtp]` is set,
//! the same notice mailed to the subscription's `owner_email` ([`Mailer`], [`smtp`]).
//!
//! The Kafka record is the source of truth. Mail is best effort and stays off the delivery
//! path: [`Mailer::offer`] only puts the notice in a bounded queue (when it is full the mail is
//! dropped), one task sends from it, each send bounded by `notify.smtp.timeout_ms`, and a
//! graceful stop waits for it at most `shutdown.grace_ms`. Every
//! outcome is counted in `hookd_owner_emails_total{outcome}` and every loss is logged.

pub mod smtp;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio_util::sync::CancellationToken;

use crate::telemetry::Metrics;
pub use smtp::{MailError, SmtpConfig, TlsMode};

/// Why a subscription was disabled: the notice's `cause` and the `cause` label of
/// `hookd_endpoint_disables_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DisableCause {
    /// More than `disable_after_failures` failed requests in a row.
    Failures,
    /// The endpoint answered `410 Gone`.
    Gone,
    /// An operator or the customer, through the admin API or the portal.
    Operator,
}

impl DisableCause {
    /// Every cause, for the metric's series initialised at start.
    pub const ALL: [Self; 3] = [Self::Failures, Self::Gone, Self::Operator];

    pub fn label(self) -> &'static str {
        match self {
            Self::Failures => "failures",
            Self::Gone => "gone",
            Self::Operator => "operator",
        }
    }
}

/// The `endpoint.disabled` notice: the value written to `hookd.notifications` (JSON, in this
/// field order) and what the owner's e-mail says.
#[derive(Debug, Clone, Serialize)]
pub struct Notice {
    /// Always `endpoint.disabled`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub tenant: String,
    pub subscription: String,
    /// The endpoint's URL with secret-looking query values redacted.
    pub url: String,
    pub owner_email: Option<String>,
    pub last_error: String,
    pub cause: DisableCause,
    pub reason: String,
    /// When it was disabled, RFC 3339.
    pub at: String,
}

/// `[notify]`: how owners hear about their endpoints besides `hookd.notifications`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotifyConfig {
    /// Mail the `endpoint.disabled` notice to the subscription's `owner_email`. Absent: no
    /// mail is sent (the notice is on `hookd.notifications` either way).
    pub smtp: Option<SmtpConfig>,
}

/// Hands notices to the mail task without waiting for it.
pub struct Mailer {
    queue: mpsc::Sender<Notice>,
    causes: Vec<DisableCause>,
    metrics: Metrics,
}

/// The mail task, to wait for after `stop`.
pub type MailTask = tokio::task::JoinHandle<()>;

impl Mailer {
    /// Starts the mail task when `[notify.smtp]` is set; it runs until `stop`, and then for at
    /// most `grace` (`shutdown.grace_ms`) more.
    pub fn start(
        config: &NotifyConfig,
        metrics: &Metrics,
        stop: CancellationToken,
        grace: Duration,
    ) -> Result<Option<(Self, MailTask)>, MailError> {
        let Some(c) = &config.smtp else { return Ok(None) };
        let sender = smtp::Sender::new(c)?;
        let (tx, rx) = mpsc::channel(c.queue.max(1));
        let task = tokio::spawn(run(sender, rx, metrics.clone(), stop, grace));
        tracing::info!(host = %c.host, port = c.port(), tls = ?c.tls, "Owner e-mail on.");
        Ok(Some((Self { queue: tx, causes: c.causes.clone(), metrics: metrics.clone() }, task)))
    }

    /// Queues the owner's e-mail for `notice`, if its cause is one that is mailed; never waits.
    pub fn offer(&self, notice: &Notice) {
        if !self.causes.contains(&notice.cause) {
            return;
        }
        if notice.owner_email.as_deref().is_none_or(|a| a.trim().is_empty()) {
            self.metrics.owner_emails.with_label_values(&["no_address"]).inc();
            tracing::info!(subscription = %notice.subscription, "No owner e-mail sent: the subscription has no owner_email.");
            return;
        }
        match self.queue.try_send(notice.clone()) {
            Ok(()) => {}
            Err(TrySendError::Full(n)) => dropped(&self.metrics, &n, "the mail queue (notify.smtp.queue) is full"),
            Err(TrySendError::Closed(n)) => dropped(&self.metrics, &n, "hookd is stopping"),
        }
    }
}

fn dropped(metrics: &Metrics, notice: &Notice, why: &str) {
    metrics.owner_emails.with_label_values(&["dropped"]).inc();
    tracing::warn!(subscription = %notice.subscription, why, "Owner e-mail dropped; the notice on hookd.notifications stands.");
}

/// Sends queued notices one after the other. After `stop` nothing more is queued, and what is
/// queued or being sent gets at most `budget` in all (`shutdown.grace_ms`, or the mail timeout
/// if shorter); the rest is dropped and counted.
async fn run(sender: smtp::Sender, mut queue: mpsc::Receiver<Notice>, metrics: Metrics, stop: CancellationToken, budget: Duration) {
    let deadline = async {
        stop.cancelled().await;
        tokio::time::sleep(budget.min(sender.timeout())).await
    };
    tokio::pin!(deadline);
    let mut closing = false;
    loop {
        let notice = tokio::select! {
            n = queue.recv() => match n {
                Some(n) => n,
                None => return,
            },
            _ = stop.cancelled(), if !closing => {
                queue.close();
                closing = true;
                continue;
            }
        };
        tokio::select! {
            _ = send_one(&sender, &notice, &metrics) => {}
            _ = &mut deadline => {
                dropped(&metrics, &notice, "hookd is stopping");
                break;
            }
        }
    }
    queue.close();
    while let Ok(notice) = queue.try_recv() {
        dropped(&metrics, &notice, "hookd is stopping");
    }
}

async fn send_one(sender: &smtp::Sender, notice: &Notice, metrics: &Metrics) {
    match sender.send(notice).await {
        Ok(()) => {
            metrics.owner_emails.with_label_values(&["sent"]).inc();
            tracing::info!(subscription = %notice.subscription, "Owner e-mailed: endpoint disabled.");
        }
        Err(error) => {
            metrics.owner_emails.with_label_values(&["failed"]).inc();
            tracing::warn!(%error, subscription = %notice.subscription, "Owner e-mail not sent; the notice on hookd.notifications stands.");
        }
    }
}
