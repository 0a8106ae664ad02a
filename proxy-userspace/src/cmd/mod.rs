//! The binary's subcommands. Each goes through the same source, model and maps as the others, so
//! `plan`, `trace` and `run` can never disagree.

pub mod inspect;
pub mod kube_proxy;
pub mod plan;
pub mod run;
pub mod trace;

use proxy_userspace::config::{ProxyConfig, ProxyFlags};

/// Resolves the flags and config file, logging the warnings.
pub fn resolve(flags: &ProxyFlags) -> anyhow::Result<ProxyConfig> {
    let (config, warnings) = flags.resolve()?;
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    Ok(config)
}
