//! Configuration: the TOML file of `hookd run --config FILE`.
//!
//! Every struct denies unknown keys, so a typo is an error naming the key instead of a
//! silently ignored setting. Every field has a default (documented here and mirrored in
//! `config/hookd.toml`), so a file holding only the keys of DESIGN section 3 runs.
//! [`Config::validate`] does the cross-field checks serde cannot.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod sections;
#[cfg(test)]
mod tests;
mod validate;

pub use sections::*;

use crate::render::DialectConfig;
use crate::route::subscription::Subscription;

/// A config file that could not be used; the message names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub topics: TopicsConfig,
    pub state: StateConfig,
    pub admin: AdminConfig,
    pub ingest: IngestConfig,
    pub delivery: DeliveryConfig,
    pub shutdown: ShutdownConfig,
    pub chat: ChatConfig,
    /// The customer portal, `[portal]` ([`crate::portal`]).
    pub portal: crate::portal::PortalConfig,
    /// Owner notices besides `hookd.notifications`: `[notify.smtp]` mails them.
    pub notify: crate::notify::NotifyConfig,
    /// Custom dialects, `[dialect.<name>]`, defined without a rebuild.
    pub dialect: BTreeMap<String, DialectConfig>,
    /// Static subscriptions, `[[subscription]]`; the subscriptions topic adds to them.
    pub subscription: Vec<Subscription>,
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let config = Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse { path: path.to_owned(), message },
            other => other,
        })?;
        Ok(config)
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse { path: PathBuf::new(), message: e.to_string() })?;
        config.validate()?;
        Ok(config)
    }
}
