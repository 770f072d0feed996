//! The command line: `portal run`, `portal check`, `portal certs init`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::Config;

#[derive(Parser)]
#[command(
    name = "portal",
    version,
    about = "A TLS-terminating, leader-aware proxy for replicated databases"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the configured endpoints until SIGTERM or SIGINT.
    Run {
        /// The configuration file.
        #[arg(short, long)]
        config: PathBuf,
        /// Log format on stderr.
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Validate a configuration and print what it would serve.
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Certificate helpers.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Generate a self-signed CA and a server certificate signed by it.
    Init {
        /// Directory for ca.crt, ca.key, server.crt and server.key.
        #[arg(long)]
        dir: PathBuf,
        /// A DNS name or IP address the server certificate is valid for (repeatable).
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        /// Validity of the server certificate, in days.
        #[arg(long, default_value_t = 825)]
        days: u32,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Threads of the control runtime.
const CONTROL_THREADS: usize = 1;

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config, log_format } => {
            init_logging(log_format);
            let config = match Config::load(&config) {
                Ok(config) => config,
                Err(err) => {
                    eprintln!("portal: {err}");
                    return ExitCode::from(2);
                }
            };
            raise_descriptor_limit(&config);
            // The control runtime: probes, views, DCS sources, the admin
            // API, reloads. The data path runs on its own threads
            // (`data_threads`), so this one needs little.
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(CONTROL_THREADS)
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(err) => {
                    eprintln!("portal: cannot start the runtime: {err}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(crate::server::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("portal: {err:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check { config } => match check(&config) {
            Ok(summary) => {
                print!("{summary}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("portal: {err}");
                ExitCode::FAILURE
            }
        },
        Command::Certs {
            command:
                CertsCommand::Init {
                    dir,
                    hosts,
                    days,
                    force,
                },
        } => match crate::certs::init(&dir, &hosts, days, force) {
            Ok(written) => {
                for file in written.files {
                    println!("wrote {}", file.display());
                }
                println!(
                    "clients verify the portal with {}",
                    dir.join(crate::certs::CA_CERT).display()
                );
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("portal: {err}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Raises the soft limit on open files to the hard one (each session
/// holds two descriptors), and warns when the endpoints' limits cannot fit.
fn raise_descriptor_limit(config: &Config) {
    let needed = config.descriptors_needed();
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < needed => tracing::warn!(
            limit,
            needed,
            "the open-file limit (RLIMIT_NOFILE) is below what max_connections and max_handshakes allow; raise the hard limit (ulimit -Hn, LimitNOFILE=) or lower them"
        ),
        Ok(limit) => tracing::info!(limit, needed, "open-file limit"),
        Err(err) => tracing::warn!(error = %err, "cannot raise the open-file limit"),
    }
}

/// The warnings `portal check` prints after its summary.
fn check_warnings(config: &Config) -> Vec<String> {
    let mut warnings = Vec::new();
    let needed = config.descriptors_needed();
    if let Ok((_, hard)) = rlimit::Resource::NOFILE.get() {
        if hard < needed {
            warnings.push(format!(
                "warning: the endpoints' max_connections and max_handshakes allow {needed} open files, above this machine's hard limit of {hard} (RLIMIT_NOFILE): raise it (ulimit -Hn, LimitNOFILE=) or lower the limits"
            ));
        }
    }
    warnings
}

/// Loads the config and the TLS identities it names; returns a summary.
fn check(path: &std::path::Path) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let config = Config::load(path)?;
    let mut out = String::new();
    let _ = writeln!(out, "{}: ok", path.display());
    let _ = writeln!(out, "admin on http://{}", config.admin.listen);
    for c in &config.clusters {
        let _ = writeln!(
            out,
            "cluster {} ({}): probe every {:?} ({:?} without a leader), timeout {:?}, rise {} fall {}",
            c.name, c.protocol, c.probe.interval, c.probe.fast_interval, c.probe.timeout, c.probe.rise, c.probe.fall
        );
        for m in &c.members {
            let _ = writeln!(out, "  member {} at {}", m.name, m.address);
        }
        for e in &c.endpoints {
            crate::tls::server_config(&e.tls, crate::frontend::alpn(c.protocol))
                .map_err(|err| anyhow::anyhow!("{}: endpoint {}: {err}", path.display(), e.name))?;
            let _ = writeln!(
                out,
                "  endpoint {} on {} (TLS 1.2/1.3, {}{}{}): route {}{}, hold {:?}, max {} connections{}, {} handshakes ({} per source), idle timeout {}, on leader change {:?}",
                e.name,
                e.listen,
                e.tls.cert.display(),
                e.tls.client_ca.as_ref().map(|ca| format!(", client certificates from {} ({:?})", ca.display(), e.tls.client_auth)).unwrap_or_default(),
                e.proxy_protocol.as_ref().map(|pp| format!(", PROXY protocol from {}", pp.trusted.iter().map(ToString::to_string).collect::<Vec<_>>().join(" "))).unwrap_or_default(),
                e.route,
                if e.route == crate::config::Route::Leader { String::new() } else { format!(" ({:?})", e.balance) },
                e.hold_timeout,
                e.max_connections,
                e.max_connections_per_source.map(|n| format!(" ({n} per source)")).unwrap_or_default(),
                e.max_handshakes,
                e.max_handshakes_per_source,
                e.idle_timeout.map(|t| format!("{t:?}")).unwrap_or_else(|| "none".into()),
                e.on_leader_change,
            );
        }
    }
    for warning in check_warnings(&config) {
        let _ = writeln!(out, "{warning}");
    }
    Ok(out)
}
