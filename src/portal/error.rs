//! Why a portal request was refused or failed, and the page that says so.

use axum::http::StatusCode;

use super::guard::Forgery;
use super::link::LinkError;
use crate::admin::api::Failure;

/// A portal request that did not do what it asked; each kind has its status.
#[derive(Debug, thiserror::Error)]
pub enum PortalError {
    /// Expired, tampered with, or signed with another secret: 401.
    #[error("{0}")]
    Link(#[from] LinkError),
    /// A state-changing request without the page's CSRF token or from another origin: 403.
    #[error("{0}")]
    Forgery(#[from] Forgery),
    /// No subscription of that id belongs to the link's tenant: 404 (another tenant's is not
    /// told apart from none).
    #[error("no webhook `{0}` on this page")]
    NotFound(String),
    /// A form value hookd cannot use: 400.
    #[error("{0}")]
    BadRequest(String),
    /// Enable, disable or replay did not happen ([`crate::admin::api`]'s answer: 503 when
    /// Kafka did not acknowledge in time, ...).
    #[error("{}", .0.message())]
    Action(Failure),
    /// The endpoint store could not be read: 500.
    #[error("endpoint state: {0}")]
    State(#[from] sled::Error),
    /// A page did not render: 500.
    #[error("rendering the page: {0}")]
    Render(#[from] minijinja::Error),
}

impl From<Failure> for PortalError {
    fn from(f: Failure) -> Self {
        Self::Action(f)
    }
}

impl PortalError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Link(_) => StatusCode::UNAUTHORIZED,
            Self::Forgery(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Action(f) => f.status(),
            Self::State(_) | Self::Render(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The heading of its error page.
    pub fn title(&self) -> &'static str {
        match self {
            Self::Link(_) => "This link does not open the page",
            Self::Forgery(_) => "This request was refused",
            Self::NotFound(_) => "Not found",
            Self::BadRequest(_) => "That did not work",
            Self::Action(f) if f.status() == StatusCode::SERVICE_UNAVAILABLE => "Not done: please try again in a minute",
            _ => "Something went wrong",
        }
    }

    /// What the page tells the customer; internal failures say little.
    pub fn message(&self) -> String {
        match self {
            Self::Link(e) => format!("{e}. Ask for a new link."),
            Self::State(_) | Self::Render(_) => "hookd could not show this page; the operator's logs say why.".into(),
            other => other.to_string(),
        }
    }
}
