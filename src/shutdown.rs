//! Bounded stops. Every step of a graceful stop that waits on something hookd does not
//! control (tasks finishing, a consumer leaving its group, a connection closing) waits a
//! bounded time; one that overruns is logged with its name, counted in
//! `hookd_shutdown_overruns_total{step}`, and left behind. That loses nothing: work that did
//! not finish was not committed and is done again after restart (DESIGN section 2). The
//! process-wide bound is `shutdown.deadline_ms`, kept by the binary.

use std::future::Future;
use std::time::Duration;

use crate::telemetry::Metrics;

/// How long one stop step may take once its own grace (if any) is over.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// Awaits `step` for at most `limit`; `None` when it overran (logged and counted).
pub async fn bounded<F: Future>(metrics: &Metrics, name: &'static str, limit: Duration, step: F) -> Option<F::Output> {
    match tokio::time::timeout(limit, step).await {
        Ok(out) => Some(out),
        Err(_) => {
            metrics.shutdown_overruns.with_label_values(&[name]).inc();
            tracing::error!(
                step = name,
                ?limit,
                "Stop step did not finish in time; going on without it (unfinished work is redone after restart)."
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_overrunning_step_is_left_and_counted() {
        let m = Metrics::new();
        assert_eq!(bounded(&m, "tasks", STEP_TIMEOUT, std::future::pending::<()>()).await, None);
        assert_eq!(m.shutdown_overruns.with_label_values(&["tasks"]).get(), 1);
        assert_eq!(bounded(&m, "tasks", STEP_TIMEOUT, async { 7 }).await, Some(7));
        assert_eq!(m.shutdown_overruns.with_label_values(&["tasks"]).get(), 1);
    }
}
