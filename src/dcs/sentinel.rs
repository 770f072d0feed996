//! Redis Sentinel as the source that names the leader.
//!
//! The source asks one Sentinel `SENTINEL get-master-addr-by-name` and the
//! master's `config-epoch` (the term Sentinel orders failovers by), and
//! subscribes to `+switch-master` on a second connection so a failover
//! reaches the view when Sentinel announces it. It re-asks every `timeout`
//! as well, which also notices a Sentinel that stopped answering; then it
//! moves on to the next configured address. Both connections are plain, or
//! TLS verified against `dcs.sentinel.tls`.

use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{MultiplexedConnection, PubSub};
use redis::{AsyncConnectionConfig, RedisConnectionInfo};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::{Reporter, SourceContext, RECONNECT_PAUSE};
use crate::backend::{self, Origination};
use crate::config::SentinelDcs;
use crate::stream::Stream;
use crate::view::DcsReport;

pub async fn run(
    config: SentinelDcs,
    ctx: SourceContext,
    mut reporter: Reporter,
    cancel: CancellationToken,
) {
    // Checked when the configuration was loaded; a failure here means the
    // files changed since.
    let tls = match config.tls.as_ref().map(Origination::new).transpose() {
        Ok(tls) => tls,
        Err(err) => {
            let error = format!("dcs.sentinel.tls: {err}");
            tracing::error!(cluster = %ctx.cluster, %error, "cannot build the TLS client for Sentinel");
            if reporter.send(DcsReport::Unreachable { error }).await {
                cancel.cancelled().await;
            }
            return;
        }
    };
    let mut next = 0usize;
    loop {
        let address = &config.addresses[next % config.addresses.len()];
        next = next.wrapping_add(1);
        let error = tokio::select! {
            error = session(&config, tls.as_ref(), address, &ctx, &mut reporter) => error,
            _ = cancel.cancelled() => return,
        };
        ctx.up.set(0);
        let Some(error) = error else {
            return;
        };
        tracing::warn!(cluster = %ctx.cluster, sentinel = %address, %error, "Sentinel unreachable; trying the next one");
        if !reporter.send(DcsReport::Unreachable { error }).await {
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(RECONNECT_PAUSE) => {}
            _ = cancel.cancelled() => return,
        }
    }
}

/// The credentials every connection to a Sentinel starts with.
fn settings(config: &SentinelDcs) -> RedisConnectionInfo {
    let mut settings = RedisConnectionInfo::default();
    if let Some(user) = &config.username {
        settings = settings.set_username(user);
    }
    if let Some(password) = &config.password {
        settings = settings.set_password(password.expose());
    }
    settings
}

/// One connection to the Sentinel at `address`, plain or TLS, the way the
/// portal connects to everything ([`backend::connect_direct`]).
async fn dial(
    config: &SentinelDcs,
    tls: Option<&Origination>,
    address: &str,
) -> Result<Stream, String> {
    backend::connect_direct(address, tls, config.timeout)
        .await
        .map_err(|err| format!("connect {address}: {err}"))
}

/// One Sentinel: returns why it was given up, or `None` when the view is gone.
async fn session(
    config: &SentinelDcs,
    tls: Option<&Origination>,
    address: &str,
    ctx: &SourceContext,
    reporter: &mut Reporter,
) -> Option<String> {
    let settings = settings(config);
    let stream = match dial(config, tls, address).await {
        Ok(stream) => stream,
        Err(err) => return Some(err),
    };
    let connection_config = AsyncConnectionConfig::new().set_response_timeout(Some(config.timeout));
    let setup = MultiplexedConnection::new_with_config(&settings, stream, connection_config);
    let (mut conn, driver) = match tokio::time::timeout(config.timeout, setup).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(err)) => return Some(format!("connect {address}: {err}")),
        Err(_) => return Some(format!("connect {address}: timed out")),
    };
    let _driver = AbortOnDropHandle::new(tokio::spawn(driver));
    let subscribe = async {
        let stream = dial(config, tls, address).await?;
        let mut pubsub = PubSub::new(&settings, stream)
            .await
            .map_err(|err| format!("subscribe {address}: {err}"))?;
        pubsub
            .subscribe("+switch-master")
            .await
            .map_err(|err| format!("subscribe {address}: {err}"))?;
        Ok::<_, String>(pubsub)
    };
    let pubsub = match tokio::time::timeout(config.timeout, subscribe).await {
        Ok(Ok(pubsub)) => pubsub,
        Ok(Err(err)) => return Some(err),
        Err(_) => return Some(format!("subscribe {address}: timed out")),
    };
    let mut messages = pubsub.into_on_message();
    ctx.up.set(1);
    tracing::info!(cluster = %ctx.cluster, sentinel = address, tls = tls.is_some(), master = %config.master_name, "Sentinel connected; watching +switch-master");
    let recheck = config.timeout.max(Duration::from_millis(200));
    let mut warned: Option<String> = None;
    loop {
        let report = match ask(&mut conn, config, ctx, &mut warned).await {
            Ok(report) => report,
            Err(err) => return Some(err),
        };
        if !reporter.send(report).await {
            return None;
        }
        tokio::select! {
            message = messages.next() => match message {
                None => return Some("subscription connection closed".into()),
                Some(message) => {
                    let payload: String = message.get_payload().unwrap_or_default();
                    // "<master-name> <old-ip> <old-port> <new-ip> <new-port>"
                    if payload.split(' ').next() == Some(config.master_name.as_str()) {
                        ctx.events.inc();
                        tracing::info!(cluster = %ctx.cluster, switch = %payload, "Sentinel announced a switch of master");
                    }
                }
            },
            _ = tokio::time::sleep(recheck) => {}
        }
    }
}

/// The master Sentinel names now, with its config epoch. `warned` holds the
/// last unknown master warned about, so a recheck does not repeat it.
async fn ask(
    conn: &mut MultiplexedConnection,
    config: &SentinelDcs,
    ctx: &SourceContext,
    warned: &mut Option<String>,
) -> Result<DcsReport, String> {
    let master: Option<(String, u16)> = redis::cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg(&config.master_name)
        .query_async(conn)
        .await
        .map_err(|err| format!("SENTINEL get-master-addr-by-name: {err}"))?;
    let Some((host, port)) = master else {
        return Err(format!(
            "Sentinel does not monitor a master named {:?}",
            config.master_name
        ));
    };
    let fields: Vec<String> = redis::cmd("SENTINEL")
        .arg("master")
        .arg(&config.master_name)
        .query_async(conn)
        .await
        .map_err(|err| format!("SENTINEL master: {err}"))?;
    let epoch = config_epoch(&fields);
    let leader = ctx.roster.member_at(&host, port);
    let named = format!("{host}:{port}");
    if leader.is_none() && warned.as_deref() != Some(named.as_str()) {
        tracing::warn!(cluster = %ctx.cluster, master = %named, "Sentinel names a master that is not a configured member");
        *warned = Some(named);
    }
    Ok(DcsReport::Named {
        leader,
        term: epoch,
    })
}

/// `config-epoch` from `SENTINEL master`'s flat field list.
fn config_epoch(fields: &[String]) -> Option<u64> {
    fields
        .chunks_exact(2)
        .find(|pair| pair[0] == "config-epoch")
        .and_then(|pair| pair[1].parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_epoch_is_read_from_the_field_list() {
        let fields: Vec<String> = [
            "name",
            "m",
            "ip",
            "127.0.0.1",
            "config-epoch",
            "3",
            "flags",
            "master",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(config_epoch(&fields), Some(3));
        assert_eq!(config_epoch(&fields[..4]), None);
        assert_eq!(
            config_epoch(&["config-epoch".to_string(), "x".to_string()]),
            None
        );
    }
}
