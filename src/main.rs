//! The `starling` command: run the server and administer it.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use starling::auth::StoredCredentials;
use starling::config::Config;
use starling::storage::{AccountStore, Store};

#[derive(Parser)]
#[command(name = "starling", version, about = "Starling XMPP server")]
struct Cli {
    /// Configuration file (TOML). Default: $STARLING_CONFIG, else
    /// ./starling.toml if it exists, else built-in defaults.
    #[arg(short, long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve,
    /// Manage accounts.
    User {
        #[command(subcommand)]
        action: UserAction,
    },
    /// Manage message archives (XEP-0313).
    Archive {
        #[command(subcommand)]
        action: ArchiveAction,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Check the configuration and exit.
    CheckConfig,
    /// Generate self-signed certificates for the configured domains.
    GenCert,
    /// Check federation with a remote domain step by step: DNS (SRV and
    /// addresses), TCP connection, TLS and its certificate, authentication
    /// (SASL EXTERNAL or dialback). Dialback needs this server running, as
    /// the remote server connects back to it.
    S2sCheck {
        /// The remote domain, e.g. example.net.
        domain: String,
        /// The local domain to connect from (default: the first one).
        #[arg(long)]
        from: Option<String>,
    },
}

#[derive(Subcommand)]
enum UserAction {
    /// Create an account. JID as user@domain, or just user for the first
    /// configured domain.
    Add {
        jid: String,
        /// The password (else read from stdin, or prompted for).
        #[arg(long)]
        password: Option<String>,
    },
    /// Delete an account and its data.
    Del { jid: String },
    /// Change a password.
    Passwd {
        jid: String,
        #[arg(long)]
        password: Option<String>,
    },
    /// List accounts of a domain (default: every configured domain).
    List { domain: Option<String> },
}

#[derive(Subcommand)]
enum ArchiveAction {
    /// Set how long one archive keeps messages: `forever`, `default` (the
    /// server's `archive.retention`), or a number with d, h, m or s.
    Retention { jid: String, retention: String },
    /// Delete expired messages now (the server also does this every
    /// `archive.expiry_interval_secs`).
    Expire,
}

fn load_config(path: Option<PathBuf>) -> Result<Config, String> {
    let path = path
        .or_else(|| std::env::var_os("STARLING_CONFIG").map(PathBuf::from))
        .or_else(|| {
            let p = PathBuf::from("starling.toml");
            p.exists().then_some(p)
        });
    match path {
        Some(p) => Config::load(&p).map_err(|e| e.to_string()),
        None => Ok(Config::default()),
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .init();
}

/// Split `user@domain` (or `user`, for the first configured domain) and
/// normalise the username.
fn parse_account(cfg: &Config, jid: &str) -> Result<(String, String), String> {
    let (user, domain) = match jid.rsplit_once('@') {
        Some((u, d)) => (u.to_owned(), d.to_lowercase()),
        None => (jid.to_owned(), cfg.server.domains[0].clone()),
    };
    if !cfg.is_local_domain(&domain) {
        return Err(format!(
            "{domain} is not a configured domain (server.domains = {:?})",
            cfg.server.domains
        ));
    }
    let user =
        starling::auth::prep_username(&user).map_err(|_| format!("invalid username {user:?}"))?;
    Ok((user, domain))
}

/// The password from --password, stdin (when not a terminal), or a prompt.
fn read_password(given: Option<String>) -> Result<String, String> {
    if let Some(p) = given {
        return Ok(p);
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        let mut line = String::new();
        stdin
            .lock()
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        let p = line.trim_end_matches(['\r', '\n']).to_owned();
        if p.is_empty() {
            return Err("empty password on stdin".into());
        }
        return Ok(p);
    }
    let p1 = prompt("Password: ")?;
    let p2 = prompt("Repeat password: ")?;
    if p1 != p2 {
        return Err("passwords do not match".into());
    }
    Ok(p1)
}

fn prompt(label: &str) -> Result<String, String> {
    // Without a terminal-control crate, turn echo off with stty when there.
    eprint!("{label}");
    let _ = std::io::stderr().flush();
    let echo_off = std::process::Command::new("stty")
        .arg("-echo")
        .status()
        .is_ok();
    let mut line = String::new();
    let r = std::io::stdin().lock().read_line(&mut line);
    if echo_off {
        let _ = std::process::Command::new("stty").arg("echo").status();
        eprintln!();
    }
    r.map_err(|e| e.to_string())?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

async fn open_store(cfg: &Config) -> Result<Store, String> {
    Store::open(&cfg.database_url(), cfg.database.max_connections)
        .await
        .map_err(|e| format!("cannot open the database {}: {e}", cfg.database_url()))
}

async fn user_command(cfg: Config, action: UserAction) -> Result<(), String> {
    let store = open_store(&cfg).await?;
    let iterations = cfg.auth.scram_iterations;
    match action {
        UserAction::Add { jid, password } => {
            let (user, domain) = parse_account(&cfg, &jid)?;
            let password = read_password(password)?;
            let creds = StoredCredentials::from_password(&password, iterations).map_err(|_| {
                "the password is empty or contains prohibited characters".to_string()
            })?;
            if store
                .create_account(&domain, &user, &creds)
                .await
                .map_err(|e| e.to_string())?
            {
                println!("created {user}@{domain}");
            } else {
                return Err(format!("{user}@{domain} exists already"));
            }
        }
        UserAction::Del { jid } => {
            let (user, domain) = parse_account(&cfg, &jid)?;
            if store
                .delete_account(&domain, &user)
                .await
                .map_err(|e| e.to_string())?
            {
                println!("deleted {user}@{domain}");
            } else {
                return Err(format!("no account {user}@{domain}"));
            }
        }
        UserAction::Passwd { jid, password } => {
            let (user, domain) = parse_account(&cfg, &jid)?;
            let password = read_password(password)?;
            let creds = StoredCredentials::from_password(&password, iterations).map_err(|_| {
                "the password is empty or contains prohibited characters".to_string()
            })?;
            if store
                .set_credentials(&domain, &user, &creds)
                .await
                .map_err(|e| e.to_string())?
            {
                println!("password changed for {user}@{domain}");
            } else {
                return Err(format!("no account {user}@{domain}"));
            }
        }
        UserAction::List { domain } => {
            let domains = match domain {
                Some(d) => vec![d],
                None => cfg.server.domains.clone(),
            };
            for d in domains {
                for u in store.list_accounts(&d).await.map_err(|e| e.to_string())? {
                    println!("{u}@{d}");
                }
            }
        }
    }
    store.close().await;
    Ok(())
}

async fn archive_command(cfg: Config, action: ArchiveAction) -> Result<(), String> {
    use starling::storage::ArchiveStore;
    let store = open_store(&cfg).await?;
    match action {
        ArchiveAction::Retention { jid, retention } => {
            let owner = jid::BareJid::new(&jid)
                .map_err(|e| format!("{jid} is not a bare JID: {e}"))?
                .to_string();
            let secs = match retention.trim() {
                "default" => None,
                "forever" => Some(0),
                other => Some(
                    starling::config::parse_retention(other)?
                        .map(|s| s as i64)
                        .unwrap_or(0),
                ),
            };
            store
                .set_archive_retention(&owner, secs)
                .await
                .map_err(|e| e.to_string())?;
            match secs {
                None => println!(
                    "{owner}: server default retention ({})",
                    cfg.archive.retention
                ),
                Some(0) => println!("{owner}: messages kept forever"),
                Some(s) => println!("{owner}: messages kept {s} seconds"),
            }
        }
        ArchiveAction::Expire => {
            let default = starling::config::parse_retention(&cfg.archive.retention)?;
            let n = starling::modules::mam::expire(&store, default, None).await;
            println!("deleted {n} expired messages");
        }
    }
    store.close().await;
    Ok(())
}

async fn s2s_check(cfg: Config, remote: String, from: Option<String>) -> Result<(), String> {
    let local = from.unwrap_or_else(|| cfg.server.domains[0].clone());
    if !cfg.is_local_domain(&local) {
        return Err(format!("{local} is not a configured domain"));
    }
    let server = starling::server::Server::build(cfg)
        .await
        .map_err(|e| e.to_string())?;
    let s2s = starling::s2s::S2s::new(&server)
        .await
        .map_err(|e| e.to_string())?;
    println!("federation check {local} -> {remote}");
    let lines = s2s.check(&server, &local, &remote).await;
    let ok = lines.last().is_some_and(|l| l.starts_with("result: OK"));
    for l in lines {
        println!("  {l}");
    }
    server.store.close().await;
    if ok {
        Ok(())
    } else {
        Err(format!(
            "federation with {remote} does not work (see above)"
        ))
    }
}

async fn serve(cfg: Config) -> Result<(), String> {
    let handle = starling::server::Server::start(cfg)
        .await
        .map_err(|e| e.to_string())?;
    wait_for_signal(&handle.server).await;
    tracing::info!("shutting down");
    handle.shutdown().await;
    Ok(())
}

#[cfg(unix)]
async fn wait_for_signal(server: &starling::server::Server) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = hup.recv() => {
                match server.certs.reload() {
                    Ok(()) => tracing::info!("certificates reloaded"),
                    Err(e) => tracing::error!(error = %e, "certificate reload failed; keeping the old ones"),
                }
            }
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal(_server: &starling::server::Server) {
    let _ = tokio::signal::ctrl_c().await;
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let cfg = match load_config(cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("starling: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("starling: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => serve(cfg).await,
            Command::User { action } => user_command(cfg, action).await,
            Command::Archive { action } => archive_command(cfg, action).await,
            Command::Migrate => {
                let store = open_store(&cfg).await?;
                println!("database {} is up to date", cfg.database_url());
                store.close().await;
                Ok(())
            }
            Command::CheckConfig => {
                cfg.validate().map_err(|e| e.to_string())?;
                println!(
                    "configuration OK; domains {:?}; database {}",
                    cfg.server.domains,
                    cfg.database_url()
                );
                Ok(())
            }
            Command::GenCert => {
                starling::tls::CertStore::new(&cfg.tls, &cfg.server.domains)
                    .map_err(|e| e.to_string())?;
                println!("certificates are in {}", cfg.tls.cert_dir.display());
                Ok(())
            }
            Command::S2sCheck { domain, from } => s2s_check(cfg, domain, from).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("starling: {e}");
            ExitCode::FAILURE
        }
    }
}
